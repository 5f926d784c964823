"""DDQ R-CNN's inference graph as one traceable module.

Same contract as :class:`~.detr.ExportableDetector` (preprocessed batch
in, ``dets`` (B, K, 5) and ``labels`` (B, K) out, K the RoI head's
``max_per_img``, empty rows score 0 / label -1). The model's own layers run,
with three substitutions for parts that ``torch.export`` cannot trace:

* the proposal stage's distinct queries are the mask of the NMS op
  (:func:`~projects_detr_plus.ops.nms.distinct_mask`) instead of ragged
  index lists, and the proposals are its N best kept queries
  (N = ``num_distinct_queries``; ``top_kept`` of
  :mod:`projects_detr_plus.models.top_k`), with ``valid`` False on rows an
  image does not fill (the released code pads them with zeros);
* mmcv's RoIAlign becomes :func:`roi_align` (``grid_sample``) and the
  extractor's level assignment a mask over all levels;
* the stages' self-attention gets ``key_padding_mask = ~valid``, so padding
  never changes a real proposal, as :class:`DDQSparseRoIHead` predicts each
  padded image alone on its real proposals.
"""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.detectors.ddq_rcnn import DDQRCNN
from ..models.top_k import gather_rows, top_kept
from ..ops.nms import distinct_mask, exportable_iou_threshold
from .outputs import top_detections

__all__ = ['ExportableDDQRCNN', 'roi_align']


def roi_align(feat: Tensor,
              boxes: Tensor,
              output_size,
              spatial_scale: float,
              sampling_ratio: int,
              aligned: bool = True) -> Tensor:
    """mmcv's ``RoIAlign`` (average pooling) on ``grid_sample``.

    mmcv samples ``sampling_ratio`` x ``sampling_ratio`` points per bin; a
    point outside [-1, H] x [-1, W] counts as 0, others are clamped into
    the map, then bilinear: ``grid_sample(align_corners=True,
    padding_mode='border')`` times an in-range mask.

    Args:
        feat: (B, C, H, W) one pyramid level.
        boxes: (B, N, 4) RoIs of each image, xyxy in input pixels.

    Returns:
        (B * N, C, out_h, out_w), RoIs in image-major order.
    """
    out_h, out_w = output_size
    s = sampling_ratio
    batch, channels, height, width = feat.shape
    num = boxes.shape[1]
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes * spatial_scale - offset).unbind(-1)  # (B, N)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    steps_y = torch.arange(
        out_h * s, dtype=feat.dtype, device=feat.device) + 0.5
    steps_x = torch.arange(
        out_w * s, dtype=feat.dtype, device=feat.device) + 0.5
    ys = y1[..., None] + steps_y * (roi_h / (out_h * s))[..., None]
    xs = x1[..., None] + steps_x * (roi_w / (out_w * s))[..., None]
    inside = ((ys >= -1) & (ys <= height))[..., :, None] & \
        ((xs >= -1) & (xs <= width))[..., None, :]  # (B, N, oh*s, ow*s)
    gy = ys / max(height - 1, 1) * 2 - 1
    gx = xs / max(width - 1, 1) * 2 - 1
    grid = torch.stack(
        torch.broadcast_tensors(gx[..., None, :], gy[..., :, None]),
        dim=-1)  # (B, N, oh*s, ow*s, 2)
    sampled = F.grid_sample(
        feat,
        grid.reshape(batch, num * out_h * s, out_w * s, 2),
        mode='bilinear',
        padding_mode='border',
        align_corners=True)
    sampled = sampled.view(batch, channels, num, out_h * s, out_w * s)
    sampled = sampled * inside[:, None].to(sampled.dtype)
    pooled = sampled.view(batch, channels, num, out_h, s, out_w, s)
    pooled = pooled.mean((4, 6))  # (B, C, N, oh, ow)
    return pooled.transpose(1, 2).reshape(batch * num, channels, out_h, out_w)


class ExportableDDQRCNN(nn.Module):
    """A :class:`DDQRCNN`'s inference as ``inputs -> (dets, labels)``."""

    def __init__(self, detector):
        super().__init__()
        if not isinstance(detector, DDQRCNN):
            raise TypeError('ExportableDDQRCNN takes a DDQRCNN, got '
                            f'{type(detector).__name__}')
        rpn, roi = detector.rpn_head, detector.roi_head
        exportable_iou_threshold(rpn.dqs_cfg)  # refused before tracing
        for stage in range(roi.num_stages):
            _check_stage(roi.bbox_roi_extractor[stage], roi.bbox_head[stage])
        self.detector = detector
        self.num_proposals = rpn.num_distinct_queries
        self.max_per_img = roi.test_cfg.max_per_img
        # torch.export fixes a size of 1 as a constant (see ExportableDDQFCN)
        self.min_dynamic_size = max(rpn.strides) + 1

    def forward(self, inputs):
        """inputs (B, 3, H, W) -> dets (B, K, 5), labels (B, K)."""
        if inputs.dim() != 4:
            raise ValueError('inputs must be (B, C, H, W), got shape '
                             f'{tuple(inputs.shape)}')
        feats = self.detector.extract_feat(inputs)
        boxes, object_feats, valid = self.proposals(feats)
        roi = self.detector.roi_head
        if roi.query_fusion is not None:
            pooled = self.roi_features(0, feats, boxes).mean((2, 3))
            object_feats = roi.query_fusion(
                torch.cat([object_feats,
                           pooled.view(object_feats.shape)],
                          dim=-1))
        size = inputs.shape[2:]
        for stage in range(roi.num_stages):
            cls_score, object_feats, boxes = self.stage(
                stage, feats, boxes, object_feats, valid, size)
        return self.top_pairs(cls_score, boxes, valid)

    def proposals(self, feats):
        """The N best distinct queries: boxes (B, N, 4), features
        (B, N, C) and valid (B, N); rows an image does not fill are zero."""
        rpn = self.detector.rpn_head
        scores, distances, _, _, cls_feats, reg_feats = rpn(
            feats[self.detector.rpn_start_level:])
        scores, boxes, point_ids = rpn.candidates(scores, distances)
        best = scores.max(-1).values  # in [0, 1]
        keep = distinct_mask(boxes, best, rpn.dqs_cfg)
        top, valid = top_kept(keep, best, self.num_proposals)
        chosen = point_ids.gather(1, top)
        features = rpn.compress(
            gather_rows(rpn.point_features(cls_feats, reg_feats), chosen))
        features = torch.where(valid[..., None], features,
                               torch.zeros_like(features))
        return gather_rows(boxes, top, valid), features, valid

    def roi_features(self, stage, feats, boxes):
        """SingleRoIExtractor on :func:`roi_align`: every RoI pooled on
        every level, the level ``map_roi_levels`` picks kept."""
        extractor = self.detector.roi_head.bbox_roi_extractor[stage]
        rois = torch.cat([boxes.new_zeros(*boxes.shape[:2], 1), boxes], -1)
        levels = extractor.map_roi_levels(
            rois.flatten(0, 1), extractor.num_inputs)
        pooled = 0
        for level, layer in enumerate(extractor.roi_layers):
            level_feats = roi_align(feats[level], boxes, layer.output_size,
                                    layer.spatial_scale, layer.sampling_ratio,
                                    layer.aligned)
            pooled = pooled + level_feats * (levels == level).to(
                level_feats.dtype)[:, None, None, None]
        return pooled

    def stage(self, stage, feats, boxes, object_feats, valid, size):
        """One DIIHead stage; padding masked out of the self-attention.
        Returns cls_score (B, N, C'), object_feats, the refined boxes."""
        head = self.detector.roi_head.bbox_head[stage]
        roi_feats = self.roi_features(stage, feats, boxes)
        batch, num = object_feats.shape[:2]
        attn_feats = head.attention_norm(
            head.attention(
                object_feats.transpose(0, 1),
                key_padding_mask=~valid)).transpose(0, 1)
        flat = attn_feats.reshape(-1, head.in_channels)
        flat = flat + head.instance_interactive_conv_dropout(
            head.instance_interactive_conv(flat, roi_feats))
        obj_feat = head.ffn_norm(
            head.ffn(head.instance_interactive_conv_norm(flat)))
        cls_feat = reg_feat = obj_feat
        for layer in head.cls_fcs:
            cls_feat = layer(cls_feat)
        for layer in head.reg_fcs:
            reg_feat = layer(reg_feat)
        cls_score = head.fc_cls(cls_feat).view(batch, num, -1)
        deltas = head.fc_reg(reg_feat)
        boxes = head.bbox_coder.decode(boxes.reshape(-1, 4), deltas)
        if head.bbox_coder.clip_border:
            limit = boxes.new_tensor([size[1], size[0]] * 2)
            boxes = torch.minimum(boxes.clamp(min=0), limit)
        return (cls_score, obj_feat.view(batch, num,
                                         -1), boxes.view(batch, num, 4))

    def top_pairs(self, cls_score, boxes, valid):
        """The top K (proposal, class) pairs of the valid proposals."""
        head = self.detector.roi_head.bbox_head[-1]
        if head.loss_cls.use_sigmoid:
            scores = cls_score.sigmoid()
        else:
            scores = cls_score.softmax(-1)[..., :-1]
        scores = torch.where(valid[..., None], scores,
                             torch.zeros_like(scores))
        return top_detections(scores, boxes, self.max_per_img)


def _check_stage(extractor, head):
    """What the wrapper reimplements must be what the stage runs."""
    from mmdet.models.roi_heads.bbox_heads import DIIHead
    from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
    if type(extractor) is not SingleRoIExtractor:
        raise ValueError('only SingleRoIExtractor exports, got '
                         f'{type(extractor).__name__}')
    layer = extractor.roi_layers[0]
    if type(layer).__name__ != 'RoIAlign' or layer.pool_mode != 'avg' or \
            layer.sampling_ratio <= 0:
        raise ValueError('only RoIAlign(pool_mode="avg", sampling_ratio > 0)'
                         f' exports, got {layer}')
    if type(head) is not DIIHead or not head.reg_class_agnostic:
        raise ValueError('only class-agnostic DIIHead stages export, got '
                         f'{type(head).__name__}')
