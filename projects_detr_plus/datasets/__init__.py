"""The embedded synthetic shapes dataset (generated on first use)."""
from .shapes_dataset import ShapesDataset, prepare_shapes
from .shapes_generator import CLASSES, ShapesSpec, generate_split

__all__ = ['ShapesDataset', 'prepare_shapes', 'CLASSES', 'ShapesSpec',
           'generate_split']
