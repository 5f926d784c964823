"""Layers of DETR+ registered into mmdet's ``MODELS``."""
from .msda_attention import MultiScaleDeformableAttentionPlus

__all__ = ['MultiScaleDeformableAttentionPlus']
