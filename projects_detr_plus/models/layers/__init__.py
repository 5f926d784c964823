"""Layers of DETR+ registered into mmdet's ``MODELS``."""
from .memory_fusion import DenseFusionEncoder, DenseMemoryFusion
from .msda_attention import MultiScaleDeformableAttentionPlus

__all__ = [
    'MultiScaleDeformableAttentionPlus', 'DenseFusionEncoder',
    'DenseMemoryFusion'
]
