"""Load the official Stable-DINO matcher, criterion and encoder from
``../shared/reference``.

The reference (IDEA-Research/Stable-DINO ``projects/stabledino``,
unmodified) is imported as the package ``stable_ref`` (a namespace over
its ``modeling/`` folder: the package's ``__init__`` imports the model,
i.e. detectron2 and the CUDA op).  What it needs of detrex comes from
detrex's own files in the Align-DETR reference folder (IDEA-Research/
detrex, which Stable-DINO is built on): ``detrex/layers/box_ops.py`` and
``detrex/modeling/criterion/criterion.py`` (``SetCriterion``); the rest is
stubbed at load time: ``torchvision.ops.boxes.box_area``,
``detrex.utils`` (one process), and the transformer building blocks of
``detrex.layers`` that ``dino_transformer.py`` names (placeholders: a test
puts real layers into the official encoder).  The stubs leave
``sys.modules`` once the reference is loaded.
"""
import copy
import importlib
import importlib.util
import os.path as osp
import sys
from contextlib import contextmanager

from torch import nn

from conftest import REPO_ROOT
from reference_stubs import detrex_stubs, module

SHARED = osp.join(osp.dirname(REPO_ROOT), 'shared', 'reference')
REFERENCE = osp.join(SHARED, 'idea-research-stable-dino')
DETREX = osp.join(SHARED, 'idea-research-detrex-align-detr')
MODELING = osp.join(REFERENCE, 'projects', 'stabledino', 'modeling')
PACKAGE = 'stable_ref'


def available():
    return osp.isfile(osp.join(MODELING, 'dn_criterion.py')) and \
        osp.isfile(osp.join(DETREX, 'detrex', 'layers', 'box_ops.py'))


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Placeholder(nn.Module):
    """Stands for a detrex layer the test replaces (never run)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


class TransformerLayerSequence(nn.Module):
    """detrex's: ``num_layers`` copies of ``transformer_layers``."""

    def __init__(self, transformer_layers=None, num_layers=None):
        super().__init__()
        self.num_layers = num_layers
        self.layers = nn.ModuleList(
            [copy.deepcopy(transformer_layers) for _ in range(num_layers)])


@contextmanager
def _stubbed_modules():
    """torchvision, detrex.{utils,layers,modeling.criterion}, only while
    loading."""
    stubs = dict(
        detrex_stubs(inverse_sigmoid=None),
        **{'detrex.modeling': module('detrex.modeling', __path__=[])})
    names = list(stubs) + [
        'detrex.layers', 'detrex.layers.box_ops', 'detrex.modeling.criterion',
        'detrex.modeling.criterion.criterion'
    ]
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(stubs)
    try:
        box_ops = _load_file(
            'detrex.layers.box_ops',
            osp.join(DETREX, 'detrex', 'layers', 'box_ops.py'))
        sys.modules['detrex.layers'] = module(
            'detrex.layers',
            __path__=[],
            box_ops=box_ops,
            FFN=Placeholder,
            MLP=Placeholder,
            BaseTransformerLayer=Placeholder,
            MultiheadAttention=Placeholder,
            MultiScaleDeformableAttention=Placeholder,
            TransformerLayerSequence=TransformerLayerSequence,
            get_sine_pos_embed=None,
            **{
                k: v
                for k, v in vars(box_ops).items() if not k.startswith('__')
            })
        criterion = _load_file(
            'detrex.modeling.criterion.criterion',
            osp.join(DETREX, 'detrex', 'modeling', 'criterion',
                     'criterion.py'))
        sys.modules['detrex.modeling.criterion'] = module(
            'detrex.modeling.criterion',
            __path__=[],
            SetCriterion=criterion.SetCriterion)
        yield
    finally:
        for name in names:
            if saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]


def load():
    """``(matcher, dn_criterion, dino_transformer)`` modules of the
    reference."""
    names = ('matcher', 'dn_criterion', 'dino_transformer')
    if PACKAGE not in sys.modules:
        with _stubbed_modules():
            sys.modules[PACKAGE] = module(PACKAGE, __path__=[MODELING])
            for name in names:
                importlib.import_module(f'{PACKAGE}.{name}')
    return tuple(sys.modules[f'{PACKAGE}.{name}'] for name in names)
