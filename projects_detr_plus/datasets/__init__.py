"""Datasets: the embedded synthetic shapes data (generated on first use) and
a COCO dataset that validates its annotations."""
from .checked_coco import CheckedCocoDataset
from .shapes_dataset import ShapesDataset, prepare_shapes
from .shapes_generator import CLASSES, ShapesSpec, generate_split

__all__ = [
    'CheckedCocoDataset', 'ShapesDataset', 'prepare_shapes', 'CLASSES',
    'ShapesSpec', 'generate_split'
]
