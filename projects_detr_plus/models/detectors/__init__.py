"""Detectors registered into mmdet's ``MODELS``."""
from .ddq_detr import DDQDETRPlus
from .ddq_fcn import DDQFCN
from .ddq_rcnn import DDQRCNN
from .deformable_detr import DeformableDETRPlus
from .dino import DINOPlus

__all__ = [
    'DDQRCNN', 'DDQFCN', 'DDQDETRPlus', 'DeformableDETRPlus', 'DINOPlus'
]
