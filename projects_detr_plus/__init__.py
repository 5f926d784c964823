"""DETR+: DETR-family detectors for MMDetection 3.x on a fast MSDeformAttn op.

``import projects_detr_plus`` registers every model, assigner and dataset into
mmdet's registries (``custom_imports`` in a config does this).  The op package
``projects_detr_plus.ops`` needs torch alone, so this module only touches mmdet
when mmdet is installed.
"""
import importlib.util

from .version import __version__

if importlib.util.find_spec('mmdet') is not None:
    from . import datasets, models, utils  # noqa: F401  (registration)

__all__ = ['__version__']
