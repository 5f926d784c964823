"""Detection heads of DETR+ (DINO's head, extended where a method needs it)."""
from .ddq_head import DDQHeadPlus
from .dino_head import DINOHeadPlus

__all__ = ['DDQHeadPlus', 'DINOHeadPlus']
