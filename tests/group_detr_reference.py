"""Load LW-DETR's Group DETR criterion and matcher from
``../shared/reference``.

The reference (Atten4Vis/LW-DETR, unmodified) is imported as its own
top-level packages ``models`` and ``util`` with its folder on ``sys.path``
only while importing.  What this machine lacks, or what the criterion does
not use, is stubbed at load time: ``torchvision`` (``ops.boxes.box_area``,
whose formula ``util/box_ops.py`` uses, and a ``__version__`` for the check
at the top of ``util/misc.py``), ``models.backbone`` (not in the reference
folder) and ``models.transformer`` (the model's transformer, with its
deformable-attention op: ``models/lwdetr.py`` imports ``build_transformer``
but ``SetCriterion`` never calls it).  Afterwards ``sys.path`` and
``sys.modules`` are as before; the loaded modules stay reachable through
:func:`load` only.
"""
import importlib
import os.path as osp
import sys

from conftest import REPO_ROOT
from reference_stubs import module, not_called, torchvision_stubs

REFERENCE = osp.join(
    osp.dirname(REPO_ROOT), 'shared', 'reference', 'atten4vis-lw-detr')
# top-level names the reference's import touches
_NAMES = ('models', 'util', 'torchvision')
_LOADED = {}


def available():
    return all(
        osp.isfile(osp.join(REFERENCE, *path))
        for path in (('models', 'lwdetr.py'), ('models', 'matcher.py'),
                     ('util', 'box_ops.py'), ('util', 'misc.py')))


def _stubs():
    return dict(
        torchvision_stubs(), **{
            'models.backbone':
            module('models.backbone', build_backbone=not_called),
            'models.transformer':
            module('models.transformer', build_transformer=not_called),
        })


def _touched(name):
    return any(name == top or name.startswith(top + '.') for top in _NAMES)


def load():
    """``(lwdetr, matcher)``: LW-DETR's ``models/lwdetr.py``
    (``SetCriterion``) and ``models/matcher.py`` (``HungarianMatcher``)."""
    if not _LOADED:
        saved = {k: v for k, v in sys.modules.items() if _touched(k)}
        for name in saved:
            del sys.modules[name]
        sys.modules.update(_stubs())
        sys.path.insert(0, REFERENCE)
        bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            for name in ('lwdetr', 'matcher'):
                _LOADED[name] = importlib.import_module(f'models.{name}')
        finally:
            sys.dont_write_bytecode = bytecode
            sys.path.remove(REFERENCE)
            sys.path_importer_cache.pop(REFERENCE, None)
            for name in [k for k in sys.modules if _touched(k)]:
                del sys.modules[name]
            sys.modules.update(saved)
    return _LOADED['lwdetr'], _LOADED['matcher']
