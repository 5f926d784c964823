"""Load MS-DETR's implementation (a) criterion from ``../shared/reference``.

The reference (Atten4Vis/MS-DETR ``impl_a/``, unmodified) is imported as
its own top-level packages ``models`` and ``util`` with ``impl_a`` on
``sys.path`` only while importing, and with what this machine lacks stubbed
at load time: ``torchvision`` (``ops.boxes.box_area``, whose formula the
criterion uses; ``batched_nms`` and ``models._utils.
IntermediateLayerGetter``, imported but not called by the criterion) and
the compiled ``MultiScaleDeformableAttention`` (imported by the
transformer, not called).  Afterwards ``sys.path`` and ``sys.modules`` are
as before (the loaded modules stay reachable through :func:`load` only).
"""
import importlib
import os.path as osp
import sys
import warnings

from conftest import REPO_ROOT
from reference_stubs import module, not_called, torchvision_stubs

REFERENCE = osp.join(
    osp.dirname(REPO_ROOT), 'shared', 'reference', 'atten4vis-ms-detr')
IMPL_A = osp.join(REFERENCE, 'impl_a')
# top-level names the reference's import touches
_NAMES = ('models', 'util', 'torchvision', 'MultiScaleDeformableAttention')
_LOADED = {}


def available():
    return osp.isfile(osp.join(IMPL_A, 'models', 'matcher_o2m.py'))


def _stubs():
    return dict(
        torchvision_stubs(
            box_ops=dict(batched_nms=not_called), layer_getter=not_called),
        MultiScaleDeformableAttention=module('MultiScaleDeformableAttention'))


def _touched(name):
    return any(name == top or name.startswith(top + '.') for top in _NAMES)


def load():
    """``(deformable_detr, matcher, matcher_o2m)``: impl_a's modules
    (``SetCriterion``; ``HungarianMatcher``; ``Stage2Assigner``)."""
    if not _LOADED:
        saved = {k: v for k, v in sys.modules.items() if _touched(k)}
        for name in saved:
            del sys.modules[name]
        sys.modules.update(_stubs())
        sys.path.insert(0, IMPL_A)
        bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            with warnings.catch_warnings():
                # ms_deform_attn.py's docstring: an invalid escape
                warnings.simplefilter('ignore', DeprecationWarning)
                warnings.simplefilter('ignore', SyntaxWarning)
                for name in ('deformable_detr', 'matcher', 'matcher_o2m'):
                    _LOADED[name] = importlib.import_module(f'models.{name}')
        finally:
            sys.dont_write_bytecode = bytecode
            sys.path.remove(IMPL_A)
            sys.path_importer_cache.pop(IMPL_A, None)
            for name in [k for k in sys.modules if _touched(k)]:
                del sys.modules[name]
            sys.modules.update(saved)
    return tuple(_LOADED[name]
                 for name in ('deformable_detr', 'matcher', 'matcher_o2m'))
