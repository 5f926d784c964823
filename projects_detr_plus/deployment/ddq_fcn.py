"""DDQ FCN's inference graph as one traceable module.

Same contract as :class:`~.detr.ExportableDetector` (preprocessed batch in,
``dets`` (B, K, 5) and ``labels`` (B, K) out, K the head's
``num_distinct_queries``, empty rows score 0 / label -1).  The head's own
code runs; its distinct queries are the mask of the NMS op
(:func:`~projects_detr_plus.ops.nms.distinct_mask`, ``NonMaxSuppression``
in ONNX) instead of ragged index lists, and the top (query, class) pairs
are taken over the kept queries of the whole batch at once
(:func:`~.outputs.top_detections`).
"""
import torch
from torch import nn

from ..models.detectors.ddq_fcn import DDQFCN
from ..ops.nms import distinct_mask, exportable_iou_threshold
from .outputs import top_detections

__all__ = ['ExportableDDQFCN']


class ExportableDDQFCN(nn.Module):
    """A :class:`DDQFCN`'s inference as ``inputs -> (dets, labels)``."""

    def __init__(self, detector):
        super().__init__()
        if not isinstance(detector, DDQFCN):
            raise TypeError('ExportableDDQFCN takes a DDQFCN, got '
                            f'{type(detector).__name__}')
        head = detector.bbox_head
        exportable_iou_threshold(head.dqs_cfg)  # refused before tracing
        self.detector = detector
        self.max_per_img = head.num_distinct_queries
        # torch.export fixes a size of 1 as a constant: with a dynamic size
        # the example must give every level (down to the largest stride)
        # at least 2 pixels a side (P7 = ceil(size / 128))
        self.min_dynamic_size = max(head.strides) + 1

    def forward(self, inputs):
        """inputs (B, 3, H, W) -> dets (B, K, 5), labels (B, K)."""
        if inputs.dim() != 4:
            raise ValueError('inputs must be (B, C, H, W), got shape '
                             f'{tuple(inputs.shape)}')
        head = self.detector.bbox_head
        scores, distances = head(self.detector.extract_feat(inputs))[:2]
        scores, boxes, _ = head.candidates(scores, distances)  # (B, n, .)
        keep = distinct_mask(boxes, scores.max(-1).values, head.dqs_cfg)
        h, w = inputs.shape[2], inputs.shape[3]
        scale = torch.tensor([w, h, w, h],
                             dtype=boxes.dtype,
                             device=boxes.device)
        boxes = torch.minimum(boxes.clamp(min=0), scale)
        # suppressed queries (score 0) fill the rows predict() leaves out
        return top_detections(scores * keep[..., None], boxes,
                              self.max_per_img)
