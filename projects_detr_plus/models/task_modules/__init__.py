"""Task modules of DETR+ (assigners), registered into mmdet's TASK_UTILS."""
from .group_assigner import GroupOneToOneAssigner
from .o2m_assigner import MSDETRAssigner
from .one_to_one_assigner import OneToOneAssigner
from .topk_hungarian_assigner import TopkHungarianAssignerPlus

__all__ = [
    'TopkHungarianAssignerPlus', 'OneToOneAssigner', 'GroupOneToOneAssigner',
    'MSDETRAssigner'
]
