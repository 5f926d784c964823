"""Detectors registered into mmdet's ``MODELS``."""
from .deformable_detr import DeformableDETRPlus
from .dino import DINOPlus

__all__ = ['DeformableDETRPlus', 'DINOPlus']
