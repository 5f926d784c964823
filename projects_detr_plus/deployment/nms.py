"""Class-agnostic NMS as a fixed-shape op that exports to ONNX.

DDQ-DETR runs NMS inside the network (before the decoder and between its
layers).  mmcv's ``batched_nms`` returns a ragged list of kept indices and
calls mmcv's compiled kernel: neither can be traced by ``torch.export``.
:func:`nms_keep` is a ``torch.library`` custom op with a fixed-shape result,
a (bs, n) mask of the kept boxes, so that:

* in PyTorch it runs exactly the model's own NMS
  (:func:`projects_detr_plus.models.layers.distinct_queries.distinct_indices`,
  i.e. mmcv's ``batched_nms``);
* under ``torch.export`` it is one opaque node (its fake kernel only gives
  the shape);
* in ONNX it becomes the standard ``NonMaxSuppression`` (opset >= 10, one
  "class", no score threshold but the candidates') followed by a
  ``ScatterND`` of the selected indices into a mask
  (:func:`translation_table`).

Suppression is ``IoU > iou_threshold`` in both.  Boxes with exactly equal
scores may be visited in a different order by mmcv (unstable sort) and by a
runtime (ONNX Runtime: lower index first).
"""
from typing import Dict, Optional

import torch
from torch import Tensor

__all__ = ['nms_keep', 'exportable_iou_threshold', 'translation_table']

# scores of non-candidates in the ONNX graph, and the score threshold that
# removes them: candidates' scores must be above it (DDQ's are in [0, 1])
_EXCLUDED_SCORE = -3.0e38
_SCORE_THRESHOLD = -1.0e38


@torch.library.custom_op('detr_plus::nms_keep', mutates_args=())
def _nms_keep_op(boxes: Tensor, scores: Tensor, candidates: Tensor,
                 iou_threshold: float) -> Tensor:
    """(bs, n) bool: kept by class-agnostic NMS within each image."""
    from ..models.layers.distinct_queries import distinct_indices
    keep = torch.zeros_like(candidates)
    kept = distinct_indices(boxes, scores,
                            dict(type='nms', iou_threshold=iou_threshold),
                            candidates)
    for image, indices in enumerate(kept):
        keep[image, indices] = True
    return keep


@_nms_keep_op.register_fake
def _nms_keep_fake(boxes, scores, candidates, iou_threshold):
    return torch.empty_like(candidates)


def nms_keep(boxes: Tensor, scores: Tensor, iou_threshold: float,
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
    return _nms_keep_op(boxes.detach().float(), scores.detach().float(),
                        candidates, float(iou_threshold))


def exportable_iou_threshold(dqs_cfg) -> float:
    """The IoU threshold of a DDQ distinct-query NMS config that
    :func:`nms_keep` reproduces; raises for anything else (another type, or
    keys it would silently ignore)."""
    cfg = dict(dqs_cfg)
    if cfg.get('type', 'nms') != 'nms' or set(cfg) - {'type',
                                                     'iou_threshold'}:
        raise ValueError('only dqs_cfg=dict(type="nms", iou_threshold=...) '
                         f'exports to ONNX, got {cfg}')
    return float(cfg['iou_threshold'])


def _onnx_nms_keep(opset) -> callable:
    op = opset

    def nms_keep_onnx(boxes, scores, candidates, iou_threshold: float):
        """NonMaxSuppression + ScatterND -> (bs, n) bool mask."""
        excluded = op.CastLike(op.Constant(value_float=_EXCLUDED_SCORE),
                               scores)
        ranked = op.Unsqueeze(op.Where(candidates, scores, excluded),
                              op.Constant(value_ints=[1]))  # (bs, 1, n)
        max_boxes = op.Shape(boxes, start=1, end=2)
        selected = op.NonMaxSuppression(
            boxes, ranked, max_boxes,
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[_SCORE_THRESHOLD]),
            center_point_box=0)  # (k, 3): image, class (0), box
        index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
        ones = op.Expand(op.Constant(value_ints=[1]),
                         op.Shape(index, start=0, end=1))
        zeros = op.Expand(op.Constant(value_ints=[0]), op.Shape(scores))
        keep = op.ScatterND(zeros, index, ones)
        return op.Cast(keep, to=9)  # BOOL

    return nms_keep_onnx


def translation_table() -> Dict:
    """``custom_translation_table`` entry of :func:`nms_keep`."""
    from .requirements import require
    onnxscript = require('onnxscript')
    from ..ops.onnx_lowering import BUILD_OPSET
    opset = getattr(onnxscript, f'opset{BUILD_OPSET}')
    return {torch.ops.detr_plus.nms_keep.default: _onnx_nms_keep(opset)}
