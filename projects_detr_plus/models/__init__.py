"""Detectors, heads, layers, query branches and assigners of DETR+.

Importing this package registers them into mmdet's registries.
"""
from . import branches, detectors, layers, task_modules  # noqa: F401
from .branches import BranchQueries, DenoisingBranch
from .detectors import DeformableDETRPlus, DINOPlus
from .task_modules import OneToOneAssigner

__all__ = ['BranchQueries', 'DenoisingBranch', 'DeformableDETRPlus',
           'DINOPlus', 'OneToOneAssigner']
