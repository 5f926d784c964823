"""The exported graphs' outputs: ``dets`` (B, K, 5) and ``labels`` (B, K).

``dets`` rows are x1, y1, x2, y2 in input pixels and the score, sorted by
score; ``labels`` are class indices, -1 for an empty row (all zeros),
following mmdeploy's detection output.
"""
import torch
from torch import Tensor

from ..models.top_k import gather_rows, top_class_pairs

__all__ = ['top_detections']


def top_detections(scores: Tensor, boxes: Tensor, k: int):
    """The ``k`` best (query, class) pairs of each image, as ``predict``
    takes them (DDQ FCN, DDQ R-CNN), in the output format.

    Args:
        scores (Tensor): (B, n, C) in [0, 1]; 0 for queries that must not
            be picked (suppressed, padding).
        boxes (Tensor): (B, n, 4).
        k (int): rows per image.

    Returns:
        tuple[Tensor, Tensor]: dets (B, k, 5) and labels (B, k); k rows
        always, those beyond the image's pairs of positive score empty.
    """
    top_scores, queries, labels = top_class_pairs(scores, k, pad=True)
    dets = torch.cat([gather_rows(boxes, queries), top_scores[..., None]], -1)
    kept = top_scores > 0
    dets = torch.where(kept[..., None], dets, torch.zeros_like(dets))
    return dets, torch.where(kept, labels, torch.full_like(labels, -1))
