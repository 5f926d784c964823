"""Distinct-query selection (class-agnostic NMS per image) as one op.

DDQ-DETR, its ``DistinctQuerySelection`` and DDQ FCN make their queries
distinct with class-agnostic NMS within each image.  Three faces of the same
computation live here:

* :func:`distinct_indices`: the eager kernel, mmcv's ``batched_nms`` over
  the whole batch at once; ragged, per image the kept indices by descending
  score;
* :func:`nms_keep`: the ``torch.library`` custom op
  ``detr_plus::nms_keep``, a fixed-shape (bs, n) mask of the kept boxes.
  In PyTorch it runs :func:`distinct_indices`; under ``torch.export`` it is
  one opaque node (its fake kernel only gives the shape);
  :func:`distinct_mask` is the mask of any NMS config, through the op where
  the op can hold the config;
* :func:`nms_translation_table`: the op's ONNX lowering, the standard
  ``NonMaxSuppression`` (one "class", no score threshold but the
  candidates') followed by a ``ScatterND`` of the selected indices into a
  mask.

Suppression is ``IoU > iou_threshold`` in both.  Boxes with exactly equal
scores may be visited in a different order by mmcv (unstable sort) and by a
runtime (ONNX Runtime: lower index first).

mmcv (the eager kernel) and onnxscript (the lowering) are imported only when
used: :mod:`projects_detr_plus.ops` stays importable with torch alone.
"""
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = [
    'distinct_indices', 'distinct_mask', 'nms_keep',
    'exportable_iou_threshold', 'nms_translation_table'
]

# scores of non-candidates in the ONNX graph, and the score threshold that
# removes them: candidates' scores must be above it (DDQ's are in [0, 1])
_EXCLUDED_SCORE = -3.0e38
_SCORE_THRESHOLD = -1.0e38


def distinct_indices(boxes: Tensor,
                     scores: Tensor,
                     nms_cfg: Dict,
                     candidates: Optional[Tensor] = None) -> List[Tensor]:
    """Class-agnostic NMS in every image, the whole batch in one call.

    Args:
        boxes (Tensor): (bs, n, 4) as (x1, y1, x2, y2).
        scores (Tensor): (bs, n).
        nms_cfg (dict): mmcv's ``batched_nms`` config, e.g.
            ``dict(type='nms', iou_threshold=0.8)``.
        candidates (Tensor, optional): (bs, n) bool, the boxes taking part
            (default all).

    Returns:
        list[Tensor]: per image, the indices of the kept boxes by
        descending score.
    """
    from mmcv.ops import batched_nms
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    image_ids, box_ids = candidates.nonzero(as_tuple=True)
    if len(box_ids) == 0:  # batched_nms fails on no boxes
        return [box_ids for _ in range(scores.shape[0])]
    boxes = boxes[image_ids, box_ids].detach().float()  # mmcv NMS: fp32
    # batched_nms separates the images by offsets of (max coordinate + 1),
    # which overlap when coordinates are negative (unclipped boxes): a
    # translation to >= 0 keeps every IoU and the images apart
    boxes = boxes - boxes.min()
    _, keep = batched_nms(boxes, scores[image_ids, box_ids].detach().float(),
                          image_ids, dict(nms_cfg))
    kept_images, kept_boxes = image_ids[keep], box_ids[keep]
    return [kept_boxes[kept_images == b] for b in range(scores.shape[0])]


def _mask(indices: List[Tensor], like: Tensor) -> Tensor:
    """(bs, n) bool, True at each image's ``indices``; ``like`` (bs, n)."""
    keep = torch.zeros_like(like, dtype=torch.bool)
    for image, kept in enumerate(indices):
        keep[image, kept] = True
    return keep


@torch.library.custom_op('detr_plus::nms_keep', mutates_args=())
def _nms_keep_op(boxes: Tensor, scores: Tensor, candidates: Tensor,
                 iou_threshold: float) -> Tensor:
    """(bs, n) bool: kept by class-agnostic NMS within each image."""
    return _mask(
        distinct_indices(boxes, scores,
                         dict(type='nms', iou_threshold=iou_threshold),
                         candidates), candidates)


@_nms_keep_op.register_fake
def _nms_keep_fake(boxes, scores, candidates, iou_threshold):
    return torch.empty_like(candidates)


def nms_keep(boxes: Tensor,
             scores: Tensor,
             iou_threshold: float,
             candidates: Optional[Tensor] = None) -> Tensor:
    """Which boxes class-agnostic NMS keeps, per image.

    Args:
        boxes (Tensor): (bs, n, 4) as (x1, y1, x2, y2).
        scores (Tensor): (bs, n).
        iou_threshold (float): a box overlapping a kept, higher-scoring
            one by IoU > this is suppressed.
        candidates (Tensor, optional): (bs, n) bool, the boxes taking part
            (default all); the others are neither kept nor suppress.

    Returns:
        Tensor: (bs, n) bool, True where kept.
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4:
        raise ValueError(f'boxes must be (bs, n, 4), got {tuple(boxes.shape)}')
    if scores.shape != boxes.shape[:2]:
        raise ValueError(f'scores must be {tuple(boxes.shape[:2])}, got '
                         f'{tuple(scores.shape)}')
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    elif candidates.shape != scores.shape or candidates.dtype != torch.bool:
        raise ValueError('candidates must be a bool tensor shaped like '
                         f'scores {tuple(scores.shape)}')
    return _nms_keep_op(boxes.detach().float(),
                        scores.detach().float(), candidates,
                        float(iou_threshold))


def _plain_iou_threshold(nms_cfg) -> Optional[float]:
    """The IoU threshold of ``dict(type='nms', iou_threshold=t)``, the one
    config :func:`nms_keep` holds; None for any other config."""
    cfg = dict(nms_cfg)
    if cfg.get('type', 'nms') != 'nms' or set(cfg) - {'type', 'iou_threshold'}:
        return None
    return float(cfg['iou_threshold'])


def exportable_iou_threshold(nms_cfg) -> float:
    """The IoU threshold of a distinct-query NMS config that
    :func:`nms_keep` reproduces; raises for anything else (another type, or
    keys it would silently ignore)."""
    threshold = _plain_iou_threshold(nms_cfg)
    if threshold is None:
        raise ValueError('only dqs_cfg=dict(type="nms", iou_threshold=...) '
                         f'exports to ONNX, got {dict(nms_cfg)}')
    return threshold


def distinct_mask(boxes: Tensor,
                  scores: Tensor,
                  nms_cfg: Dict,
                  candidates: Optional[Tensor] = None) -> Tensor:
    """(bs, n) bool mask of :func:`distinct_indices`.

    A plain ``dict(type='nms', iou_threshold=t)`` runs the op
    :func:`nms_keep` (one node under ``torch.export``, ONNX
    ``NonMaxSuppression``); any other mmcv config runs
    :func:`distinct_indices` directly (eager only).  Arguments as
    :func:`distinct_indices`.
    """
    threshold = _plain_iou_threshold(nms_cfg)
    if threshold is not None:
        return nms_keep(boxes, scores, threshold, candidates)
    return _mask(distinct_indices(boxes, scores, nms_cfg, candidates), scores)


def _onnx_nms_keep(opset) -> Callable:
    op = opset

    def nms_keep_onnx(boxes, scores, candidates, iou_threshold: float):
        """NonMaxSuppression + ScatterND -> (bs, n) bool mask."""
        excluded = op.CastLike(
            op.Constant(value_float=_EXCLUDED_SCORE), scores)
        ranked = op.Unsqueeze(
            op.Where(candidates, scores, excluded),
            op.Constant(value_ints=[1]))  # (bs, 1, n)
        max_boxes = op.Shape(boxes, start=1, end=2)
        selected = op.NonMaxSuppression(
            boxes,
            ranked,
            max_boxes,
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[_SCORE_THRESHOLD]),
            center_point_box=0)  # (k, 3): image, class (0), box
        index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
        ones = op.Expand(
            op.Constant(value_ints=[1]), op.Shape(index, start=0, end=1))
        zeros = op.Expand(op.Constant(value_ints=[0]), op.Shape(scores))
        keep = op.ScatterND(zeros, index, ones)
        return op.Cast(keep, to=9)  # BOOL

    return nms_keep_onnx


def nms_translation_table() -> Dict:
    """``custom_translation_table`` entry of :func:`nms_keep` for
    ``torch.onnx.export(..., dynamo=True)``.

    Raises:
        ImportError: when onnxscript is missing (``pip install
            projects_detr_plus[deploy]``).
    """
    try:
        import onnxscript
    except ImportError as error:
        raise ImportError(
            'exporting the NMS op to ONNX needs onnxscript: install the '
            'deploy extra, `pip install "projects_detr_plus[deploy]"` '
            '(onnx, onnxruntime, onnxscript)') from error
    from .onnx_lowering import BUILD_OPSET
    opset = getattr(onnxscript, f'opset{BUILD_OPSET}')
    return {torch.ops.detr_plus.nms_keep.default: _onnx_nms_keep(opset)}
