"""Detectors registered into mmdet's ``MODELS``."""
from .deformable_detr import DeformableDETRPlus
from .ddq_detr import DDQDETRPlus
from .dino import DINOPlus

__all__ = ['DDQDETRPlus', 'DeformableDETRPlus', 'DINOPlus']
