"""The top-k selections that eager code and export share.

* :func:`top_class_pairs`: the k best (query, class) pairs of (N, C)
  scores (flatten, top-k, label = index % C), as DETR heads and DDQ's
  heads predict;
* :func:`top_kept`: the k best items among those a mask keeps, in a fixed
  shape (DDQ's distinct queries: ranked after NMS, padded when fewer);
* :func:`gather_rows`: the rows those indices pick.

All take a leading batch dimension or none, and keep fixed shapes where
``torch.export`` needs them (``pad=True``, :func:`top_kept`).
"""
import torch
from torch import Tensor

__all__ = ['top_class_pairs', 'top_kept', 'gather_rows']


def top_class_pairs(scores: Tensor, k: int, pad: bool = False):
    """The ``k`` best (query, class) pairs, by descending score.

    Args:
        scores (Tensor): (..., N, C) class scores.
        k (int): how many pairs.
        pad (bool): always ``k`` pairs, also when N * C < k (a fixed shape
            for export): ``k`` zero scores are appended before the top-k,
            so the missing pairs have score 0 (query clamped to N - 1,
            label meaningless). False: min(k, N * C) pairs.

    Returns:
        tuple[Tensor]: ``scores``, ``queries`` (indices into N) and
        ``labels`` (indices into C), each (..., k').
    """
    num_queries, num_classes = scores.shape[-2:]
    flat = scores.flatten(-2)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(*flat.shape[:-1], k)], -1)
    else:
        k = min(k, flat.shape[-1])
    top_scores, index = flat.topk(k, dim=-1)
    queries = index // num_classes
    if pad:
        queries = queries.clamp(max=num_queries - 1)
    return top_scores, queries, index % num_classes


def top_kept(keep: Tensor, scores: Tensor, k: int):
    """The ``k`` best kept items of each image, in a fixed shape.

    Items not kept rank as -1 and ``k`` padding items as -2 are appended,
    so that the top-k exists whatever n is; rows an image cannot fill with
    kept items are invalid.

    Args:
        keep (Tensor): (B, n) bool.
        scores (Tensor): (B, n), all >= 0.
        k (int): how many to take.

    Returns:
        tuple[Tensor, Tensor]: ``index`` (B, k) into n by descending score
        (0 where invalid) and ``valid`` (B, k) bool.
    """
    ranked = torch.where(keep, scores, scores.new_tensor(-1.0))
    ranked = torch.cat(
        [ranked, ranked.new_full((ranked.shape[0], k), -2.0)], 1)
    top, index = ranked.topk(k, dim=1)
    valid = top >= 0
    return torch.where(valid, index, 0), valid


def gather_rows(x: Tensor, index: Tensor, valid: Tensor = None) -> Tensor:
    """Rows ``index`` of ``x``: (B, n, D), (B, k) -> (B, k, D); zeros where
    ``valid`` (B, k) is False (a select, not a product: unpicked rows may
    hold inf)."""
    picked = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    if valid is None:
        return picked
    return torch.where(valid[..., None], picked, picked.new_zeros(()))
