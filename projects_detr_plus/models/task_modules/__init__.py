"""Task modules of DETR+ (assigners), registered into mmdet's TASK_UTILS."""
from .one_to_one_assigner import OneToOneAssigner

__all__ = ['OneToOneAssigner']
