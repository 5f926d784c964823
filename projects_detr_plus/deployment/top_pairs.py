"""The top (query, class) pairs of a batch as fixed-shape export outputs."""
import torch
from torch import Tensor

__all__ = ['top_pairs']


def top_pairs(scores: Tensor, boxes: Tensor, k: int):
    """The ``k`` best (query, class) pairs of each image, as ``predict``
    takes them (DDQ FCN, DDQ R-CNN), in the export's output format.

    Args:
        scores: (B, n, C) in [0, 1], 0 for queries that must not be picked
            (suppressed, padding).
        boxes: (B, n, 4).

    Returns:
        dets (B, k, 5) and labels (B, k): k rows always; rows beyond the
        image's pairs of positive score are zero with label -1.
    """
    num_classes = scores.shape[-1]
    flat = scores.flatten(1)
    # k zero scores appended: always k rows, empty where n * C < k
    flat = torch.cat([flat, flat.new_zeros(flat.shape[0], k)], dim=1)
    top_scores, index = flat.topk(k, dim=1)
    query = (index // num_classes).clamp(max=boxes.shape[1] - 1)
    boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    kept = top_scores > 0
    dets = torch.cat([boxes, top_scores[..., None]], -1)
    dets = torch.where(kept[..., None], dets, torch.zeros_like(dets))
    labels = torch.where(kept, index % num_classes,
                         torch.full_like(index, -1))
    return dets, labels
