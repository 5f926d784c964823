"""Loading checkpoints made elsewhere: the official Co-DETR layout and
checkpoints trained with another number of classes."""
from .co_detr_checkpoints import convert_official_co_detr, official_key_map
from .finetune import class_counts, drop_class_dependent_mismatches

__all__ = [
    'convert_official_co_detr', 'official_key_map', 'class_counts',
    'drop_class_dependent_mismatches'
]
