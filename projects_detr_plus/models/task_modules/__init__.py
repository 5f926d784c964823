"""Task modules of DETR+ (assigners), registered into mmdet's TASK_UTILS."""
from .group_assigner import (GROUPS_KEY, GroupOneToOneAssigner,
                             with_query_groups)
from .one_to_one_assigner import OneToOneAssigner
from .topk_hungarian_assigner import TopkHungarianAssignerPlus

__all__ = ['TopkHungarianAssignerPlus', 'OneToOneAssigner', 'GroupOneToOneAssigner', 'GROUPS_KEY',
           'with_query_groups']
