"""Detectors registered into mmdet's ``MODELS``."""
from .deformable_detr import DeformableDETRPlus
from .ddq_detr import DDQDETRPlus
from .dino import DINOPlus
from .ddq_fcn import DDQFCN
from .ddq_rcnn import DDQRCNN

__all__ = ['DDQRCNN', 'DDQFCN', 'DDQDETRPlus', 'DeformableDETRPlus', 'DINOPlus']
