"""The inference graph of a DETR+ detector as one traceable module.

:class:`ExportableDetector` runs a DETR+ detector's test-time forward pass
on a preprocessed image batch and returns fixed-shape detections
(:mod:`.outputs`)::

    inputs (B, 3, H, W) float32, preprocessed (normalised, padded)
    -> dets   (B, K, 5) float32: x1, y1, x2, y2 in input pixels, score
       labels (B, K) int64: class index, -1 for an empty row

``K`` is the head's ``test_cfg.max_per_img``; rows are sorted by score.
Empty rows come last: where PyTorch's ``predict`` returns fewer than K
boxes (DDQ-DETR's suppressed queries, ``test_cfg.score_thr``).  The graph
assumes each image fills the input (``img_shape`` = input shape, no padding
mask): export and run images one at a time, or a batch of images of the
same size.  Boxes are those of ``predict(..., rescale=False)``.

The detector's own code runs, DDQ-DETR's distinct-query NMS included (the
fixed-shape op :func:`~projects_detr_plus.ops.nms.nms_keep`), but for the
mmdet code ``torch.export`` cannot trace, swapped for the forward pass by
:mod:`.mmdet_patches`.
"""
from contextlib import ExitStack

import torch
from mmdet.models.detectors import DeformableDETR
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from torch import nn

from ..models.detectors.ddq_detr import DDQDETRPlus
from ..models.top_k import gather_rows, top_class_pairs
from ..ops.nms import exportable_iou_threshold
from .mmdet_patches import level_shapes, pre_transformer, swin_windows

__all__ = ['ExportableDetector']


class ExportableDetector(nn.Module):
    """A DETR+ detector's inference as ``inputs -> (dets, labels)``.

    Args:
        detector (nn.Module): a DETR+ detector (``DeformableDETRPlus``,
            ``DINOPlus`` and the detectors built on it, ``DDQDETRPlus``), in
            eval mode for export.
    """

    def __init__(self, detector):
        super().__init__()
        if not isinstance(detector, DeformableDETR):
            raise TypeError('ExportableDetector takes a DETR+ detector '
                            '(DeformableDETRPlus, DINOPlus, DDQDETRPlus, ...'
                            f'), got {type(detector).__name__}')
        if getattr(detector.positional_encoding, 'normalize', None) is None:
            raise TypeError('only SinePositionalEncoding is supported, got '
                            f'{type(detector.positional_encoding).__name__}')
        nms = (detector.test_cfg or {}).get('nms')
        if nms:
            raise ValueError(
                f'test_cfg.nms={dict(nms)} (NMS after the detector, e.g. '
                "Co-DINO's official soft-NMS) is not part of the exported "
                'graph: export with --cfg-options model.test_cfg.nms=None '
                'for the NMS-free detections and apply it to them')
        if isinstance(detector, DDQDETRPlus):
            # a selection the graph cannot hold is refused before tracing
            exportable_iou_threshold(detector.dqs_cfg)
        self.detector = detector
        test_cfg = detector.bbox_head.test_cfg or {}
        self.max_per_img = test_cfg.get('max_per_img', detector.num_queries)
        self.score_thr = float((detector.test_cfg or {}).get('score_thr', 0.0))

    def forward(self, inputs):
        """Detections of a preprocessed batch.

        Args:
            inputs (Tensor): (B, 3, H, W), the data preprocessor's output.

        Returns:
            tuple[Tensor, Tensor]: ``dets`` (B, K, 5) and ``labels`` (B, K).
        """
        if inputs.dim() != 4:
            raise ValueError('inputs must be (B, C, H, W), got shape '
                             f'{tuple(inputs.shape)}')
        det = self.detector
        with ExitStack() as stack:
            stack.enter_context(swin_windows(det.backbone))
            feats = det.extract_feat(inputs)
            shapes = [(feat.shape[2], feat.shape[3]) for feat in feats]
            stack.enter_context(level_shapes(det, shapes))
            encoder_inputs, decoder_inputs = pre_transformer(det, feats)
            encoder_outputs = det.forward_encoder(**encoder_inputs)
            more_inputs, head_inputs = det.pre_decoder(**encoder_outputs)
            decoder_inputs.update(more_inputs)
            head_inputs.update(det.forward_decoder(**decoder_inputs))
        cls_scores, bbox_preds = det.bbox_head(**head_inputs)
        return self.detections(cls_scores[-1], bbox_preds[-1], inputs.shape[2],
                               inputs.shape[3])

    def detections(self, cls_score, bbox_pred, img_h, img_w):
        """mmdet's ``DETRHead._predict_by_feat_single`` on the whole batch.

        Args:
            cls_score (Tensor): (B, N, C) logits of the last decoder layer.
            bbox_pred (Tensor): (B, N, 4) normalised (cx, cy, w, h).
            img_h, img_w (int): the input size (``img_shape``).

        Returns:
            tuple[Tensor, Tensor]: dets (B, K, 5), labels (B, K).
        """
        head = self.detector.bbox_head
        if head.loss_cls.use_sigmoid:
            scores, query, labels = top_class_pairs(cls_score.sigmoid(),
                                                    self.max_per_img)
        else:
            scores, labels = cls_score.softmax(-1)[..., :-1].max(-1)
            k = min(self.max_per_img, cls_score.shape[1])
            scores, query = scores.topk(k, dim=1)
            labels = labels.gather(1, query)
        boxes = bbox_cxcywh_to_xyxy(gather_rows(bbox_pred, query))
        scale = torch.tensor([img_w, img_h, img_w, img_h],
                             dtype=boxes.dtype,
                             device=boxes.device)
        boxes = torch.minimum((boxes * scale).clamp(min=0), scale)
        dets = torch.cat([boxes, scores[..., None]], -1)
        # rows predict() drops: DDQ's suppressed queries (score 0), and
        # those at or below test_cfg.score_thr
        threshold = self.score_thr
        if threshold > 0 or isinstance(self.detector, DDQDETRPlus):
            valid = scores > max(threshold, 0.0)
            dets = dets * valid[..., None]
            labels = torch.where(valid, labels, -1)
        return dets, labels
