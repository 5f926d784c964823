"""Load the official Align-DETR criterion from ``../shared/reference``.

The reference (IDEA-Research/detrex ``projects/align_detr``, unmodified) is
imported as the package ``align_ref`` with what it needs from detectron2 /
detrex / torchvision stubbed at load time: ``torchvision.ops.boxes.
box_area``, ``detrex.layers`` (detrex's own ``box_ops.py`` from the
reference folder), ``detrex.utils`` (one process, no distribution).  The
stubs leave ``sys.modules`` once the reference is loaded.
"""
import importlib
import importlib.util
import os.path as osp
import sys
from contextlib import contextmanager

from conftest import REPO_ROOT
from reference_stubs import detrex_stubs, module

REFERENCE = osp.join(
    osp.dirname(REPO_ROOT), 'shared', 'reference',
    'idea-research-detrex-align-detr')


def available():
    return osp.isdir(osp.join(REFERENCE, 'projects', 'align_detr'))


@contextmanager
def _stubbed_modules():
    """torchvision, detrex.layers and detrex.utils, only while loading."""
    stubs = detrex_stubs()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    spec = importlib.util.spec_from_file_location(
        'detrex.layers.box_ops',
        osp.join(REFERENCE, 'detrex', 'layers', 'box_ops.py'))
    box_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(box_ops)
    layers = module(
        'detrex.layers',
        __path__=[],
        box_ops=box_ops,
        **{
            k: v
            for k, v in vars(box_ops).items() if not k.startswith('__')
        })
    sys.modules.update({
        'detrex.layers': layers,
        'detrex.layers.box_ops': box_ops
    })
    try:
        yield
    finally:
        for name in list(stubs) + ['detrex.layers', 'detrex.layers.box_ops']:
            if saved.get(name) is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved[name]


def load():
    """``(criterions, matchers, losses)`` modules of the reference."""
    if 'align_ref' not in sys.modules:
        with _stubbed_modules():
            # the package's __init__ imports the model (detectron2, the
            # CUDA op): a namespace over its folder skips it
            sys.modules['align_ref'] = module(
                'align_ref',
                __path__=[
                    osp.join(REFERENCE, 'projects', 'align_detr', 'modeling')
                ])
            for name in ('losses', 'matchers', 'criterions'):
                importlib.import_module(f'align_ref.{name}')
    return tuple(sys.modules[f'align_ref.{name}']
                 for name in ('criterions', 'matchers', 'losses'))
