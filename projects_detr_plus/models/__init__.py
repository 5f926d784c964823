"""Detectors, heads, layers, query branches, auxiliary heads and assigners of
DETR+.

Importing this package registers them into mmdet's registries.
"""
from . import (aux_heads, branches, detectors, heads, layers, roi_heads,
               task_modules)
from .branches import DenoisingBranch, QuerySet
from .detectors import DDQDETRPlus, DeformableDETRPlus, DINOPlus
from .heads import DDQHeadPlus
from .task_modules import OneToOneAssigner

__all__ = [
    'QuerySet',
    'DenoisingBranch',
    'DDQDETRPlus',
    'DDQHeadPlus',
    'DeformableDETRPlus',
    'DINOPlus',
    'OneToOneAssigner',
    # the subpackages, imported to register their modules
    'aux_heads',
    'branches',
    'detectors',
    'heads',
    'layers',
    'roi_heads',
    'task_modules'
]
