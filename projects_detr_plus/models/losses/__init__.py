"""The set-loss core shared by the main queries and every branch."""
from .set_losses import (SetTargets, collate_targets, fixed_targets,
                         layer_loss_dict, layer_losses, matched_set_loss,
                         matched_targets, per_image, set_loss)

__all__ = [
    'SetTargets', 'set_loss', 'collate_targets', 'fixed_targets',
    'matched_targets', 'matched_set_loss', 'layer_losses', 'layer_loss_dict',
    'per_image'
]
