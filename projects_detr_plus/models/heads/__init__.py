"""Detection heads of DETR+ (DINO's head, extended where a method needs it)."""
from .ddq_detr_head import DDQHeadPlus
from .ddq_fcn_head import DDQFCNHead
from .ddq_fcn_rpn_head import DDQFCNRPNHead
from .dino_head import DINOHeadPlus

__all__ = ['DDQFCNRPNHead', 'DDQFCNHead', 'DDQHeadPlus', 'DINOHeadPlus']
