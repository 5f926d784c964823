"""Detection heads of DETR+ (DINO's head, extended where a method needs it)."""
from .ddq_head import DDQHeadPlus

__all__ = ['DDQHeadPlus']
