"""mmdet's DINO head with the inverse-sigmoid clamp of the official Co-DINO.

The head decodes layer i's boxes as ``sigmoid(delta + inverse_sigmoid(ref,
eps))``.  mmdet's ``DeformableDETRHead.forward`` uses eps = 1e-5; the
official ``CoDINOHead.forward`` (Sense-X/Co-DETR and mmdet's
projects/CO-DETR) uses 1e-3.  They differ only for references within 1e-3
of 0 or 1 (e.g. proposals in an image's padding, whose reference is 1), by
up to about 1e-2 px; the official Co-DINO checkpoints predict as their
authors' code only with 1e-3.
"""
import torch
from mmdet.models.dense_heads import DINOHead
from mmdet.models.layers.transformer.utils import inverse_sigmoid
from mmdet.registry import MODELS


@MODELS.register_module()
class DINOHeadPlus(DINOHead):
    """``DINOHead`` whose references are clamped by ``reference_eps``.

    Args:
        reference_eps (float): the ``inverse_sigmoid`` eps of the box
            decoding (mmdet: 1e-5; official Co-DINO: 1e-3).
        *args, **kwargs: as ``DINOHead``.
    """

    def __init__(self, *args, reference_eps=1e-5, **kwargs):
        self.reference_eps = reference_eps
        super().__init__(*args, **kwargs)

    def forward(self, hidden_states, references):
        """Logits (num_layers, bs, nq, C) and boxes (num_layers, bs, nq, 4)
        of hidden states (num_layers, bs, nq, dim) on their references
        (num_layers (+ 1) of (bs, nq, 4), in [0, 1])."""
        scores, boxes = [], []
        for layer_id, state in enumerate(hidden_states):
            reference = inverse_sigmoid(
                references[layer_id], eps=self.reference_eps)
            scores.append(self.cls_branches[layer_id](state))
            boxes.append(
                (self.reg_branches[layer_id](state) + reference).sigmoid())
        return torch.stack(scores), torch.stack(boxes)
