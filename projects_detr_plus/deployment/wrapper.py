"""The inference graph of a DETR+ detector as one traceable module.

:class:`ExportableDetector` runs a DETR+ detector's test-time forward pass
on a preprocessed image batch and returns fixed-shape detections, following
mmdeploy's detection output::

    inputs (B, 3, H, W) float32, preprocessed (normalised, padded)
    -> dets   (B, K, 5) float32: x1, y1, x2, y2 in input pixels, score
       labels (B, K) int64: class index, -1 for an empty row

``K`` is the head's ``test_cfg.max_per_img``; rows are sorted by score.
Empty rows (score and box 0, label -1) come last: where PyTorch's
``predict`` returns fewer than K boxes (DDQ-DETR's suppressed queries,
``test_cfg.score_thr``).  The graph assumes each image fills the input
(``img_shape`` = input shape, no padding mask): export and run images one at
a time, or a batch of images of the same size.  Boxes are those of
``predict(..., rescale=False)``; scaling back to the original image (the
inverse of the test pipeline's resize) is left to the caller.

Everything but four export-unfriendly spots is the detector's own code:

* mmdet's ``pre_transformer`` reads the image sizes through
  ``torch._shape_as_tensor`` and per-image Python loops:
  :func:`_pre_transformer` is its no-padding path;
* mmdet's encoder reference points and two-stage proposals loop over the
  *values* of the ``spatial_shapes`` tensor: while the wrapper runs, they
  get the feature sizes as (symbolic) Python ints instead
  (:func:`_level_shapes`);
* mmdet's Swin backbone computes the batch size of its windows as
  ``int(a / b)`` of sizes, which fixes the batch size and the image size:
  :func:`_swin_windows` infers it instead;
* DDQ-DETR's distinct-query NMS (mmcv's ``batched_nms``, ragged results)
  becomes the fixed-shape :func:`~.nms.nms_keep` (:func:`_ddq_exportable`).

The substitutions are set on the detector instance for the duration of one
forward pass and removed afterwards.
"""
from contextlib import ExitStack, contextmanager

import torch
from mmdet.models.detectors import DeformableDETR
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from torch import nn

from ..models.branches import MAIN, QuerySet
from ..models.detectors.ddq_detr import DDQDETRPlus
from ..models.detectors.dino import DINOPlus
from ..models.layers.distinct_queries import DistinctQuerySelection
from .nms import exportable_iou_threshold, nms_keep

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
        # a DDQ-DETR selection the graph cannot hold is refused before tracing
        self.dqs_iou_threshold = (exportable_iou_threshold(detector.dqs_cfg)
                                  if isinstance(detector, DDQDETRPlus) else
                                  None)
        self.detector = detector
        test_cfg = detector.bbox_head.test_cfg or {}
        self.max_per_img = test_cfg.get('max_per_img', detector.num_queries)
        self.score_thr = float((detector.test_cfg or {}).get('score_thr',
                                                             0.0))

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
            stack.enter_context(_swin_windows(det.backbone))
            feats = det.extract_feat(inputs)
            shapes = [(feat.shape[2], feat.shape[3]) for feat in feats]
            stack.enter_context(_level_shapes(det, shapes))
            if isinstance(det, DDQDETRPlus):
                stack.enter_context(
                    _ddq_exportable(det, self.dqs_iou_threshold))
            encoder_inputs, decoder_inputs = _pre_transformer(det, feats)
            encoder_outputs = det.forward_encoder(**encoder_inputs)
            more_inputs, head_inputs = det.pre_decoder(**encoder_outputs)
            decoder_inputs.update(more_inputs)
            head_inputs.update(det.forward_decoder(**decoder_inputs))
        cls_scores, bbox_preds = det.bbox_head(**head_inputs)
        return self.detections(cls_scores[-1], bbox_preds[-1],
                               inputs.shape[2], inputs.shape[3])

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
        num_classes = cls_score.shape[-1]
        if head.loss_cls.use_sigmoid:
            k = min(self.max_per_img, cls_score.shape[1] * num_classes)
            scores, index = cls_score.sigmoid().flatten(1).topk(k, dim=1)
            labels = index % num_classes
            query = index // num_classes
        else:
            scores, labels = cls_score.softmax(-1)[..., :-1].max(-1)
            k = min(self.max_per_img, cls_score.shape[1])
            scores, query = scores.topk(k, dim=1)
            labels = labels.gather(1, query)
        boxes = bbox_pred.gather(1, query[..., None].expand(-1, -1, 4))
        boxes = bbox_cxcywh_to_xyxy(boxes)
        scale = torch.tensor([img_w, img_h, img_w, img_h],
                             dtype=boxes.dtype, device=boxes.device)
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


def _pre_transformer(det, feats):
    """mmdet's ``pre_transformer`` for a batch without padding.

    Args:
        feats (tuple[Tensor]): (B, dim, h_l, w_l) per level.

    Returns:
        tuple[dict, dict]: encoder inputs (``feat`` (B, keys, dim),
        ``feat_mask`` None, ``feat_pos`` (B, keys, dim), ``spatial_shapes``
        (levels, 2), ``level_start_index`` (levels,), ``valid_ratios``
        (B, levels, 2) of ones) and decoder inputs.
    """
    flat, positions = [], []
    for level, feat in enumerate(feats):
        pos = det.positional_encoding(None, input=feat)
        flat.append(feat.flatten(2).transpose(1, 2))
        positions.append(pos.flatten(2).transpose(1, 2) +
                         det.level_embed[level].view(1, 1, -1))
    spatial_shapes = torch.tensor(
        [[feat.shape[2], feat.shape[3]] for feat in feats], dtype=torch.long,
        device=feats[0].device)
    level_start_index = torch.cat((spatial_shapes.new_zeros((1, )),
                                   spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = feats[0].new_ones(feats[0].shape[0], len(feats), 2)
    shared = dict(spatial_shapes=spatial_shapes,
                  level_start_index=level_start_index,
                  valid_ratios=valid_ratios)
    encoder_inputs = dict(feat=torch.cat(flat, 1), feat_mask=None,
                          feat_pos=torch.cat(positions, 1), **shared)
    return encoder_inputs, dict(memory_mask=None, **shared)


@contextmanager
def _patched(obj, **methods):
    """Set instance attributes ``methods`` on ``obj``, then remove them."""
    for name in methods:
        if name in vars(obj):
            raise RuntimeError(f'{type(obj).__name__}.{name} is already '
                               'overridden on the instance')
    try:
        for name, method in methods.items():
            setattr(obj, name, method)
        yield
    finally:
        for name in methods:
            vars(obj).pop(name, None)


def _grid(h, w, device):
    """(h, w) pixel-centre coordinates x + 0.5, y + 0.5 as two (h, w)
    tensors: mmdet's ``linspace(0.5, n - 0.5, n)`` (bitwise: the steps are
    exactly 1), but from ``arange``, which keeps ``n`` symbolic."""
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return grid_x, grid_y


@contextmanager
def _level_shapes(det, shapes):
    """Swap mmdet's two loops over the *values* of ``spatial_shapes`` for
    twins that take the level sizes as (symbolic) ints.

    ``torch.export`` cannot turn tensor values back into sizes, and
    ``torch.linspace`` specialises symbolic sizes, so the twins use
    :func:`_grid`.  They are the no-padding paths (``memory_mask`` None) of
    ``DeformableDetrTransformerEncoder.get_encoder_reference_points`` and
    ``DeformableDETR.gen_encoder_output_proposals``.

    Args:
        shapes (list[tuple]): (h_l, w_l) per level.
    """

    def encoder_reference_points(spatial_shapes, valid_ratios, device):
        """(bs, keys, levels, 2) reference points of the encoder."""
        points = []
        for level, (h, w) in enumerate(shapes):
            ref_x, ref_y = _grid(h, w, device)
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level,
                                                            1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level,
                                                            0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def encoder_output_proposals(memory, memory_mask, spatial_shapes):
        """Transformed memory (bs, keys, dim) and proposals (bs, keys, 4)
        before the sigmoid, (cx, cy, w, h)."""
        assert memory_mask is None
        bs = memory.size(0)
        proposals = []
        for level, (h, w) in enumerate(shapes):
            grid_x, grid_y = _grid(h, w, memory.device)
            scale = torch.tensor([w, h], dtype=torch.float32,
                                 device=memory.device)
            grid = torch.stack([grid_x, grid_y], -1)[None] / scale
            grid = grid.expand(bs, -1, -1, -1)
            wh = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).sum(
            -1, keepdim=True) == proposals.shape[-1]
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(~valid, float('inf'))
        output = memory.masked_fill(~valid, float(0))
        output = det.memory_trans_norm(det.memory_trans_fc(output))
        return output, proposals

    with _patched(det.encoder,
                  get_encoder_reference_points=encoder_reference_points), \
            _patched(det,
                     gen_encoder_output_proposals=encoder_output_proposals):
        yield


@contextmanager
def _swin_windows(backbone):
    """mmdet's ``ShiftWindowMSA.window_reverse`` with the batch size
    inferred (-1) instead of ``int(windows / (H * W / ws / ws))``, which
    ``torch.export`` can only evaluate for the traced sizes; same result."""
    with ExitStack() as stack:
        for module in backbone.modules():
            if type(module).__name__ == 'ShiftWindowMSA' and hasattr(
                    module, 'window_reverse'):
                stack.enter_context(_patched(
                    module, window_reverse=_window_reverse(module)))
        yield


def _window_reverse(module):

    def window_reverse(windows, h, w):
        """(B * windows, ws, ws, C) -> (B, h, w, C)."""
        size = module.window_size
        x = windows.view(-1, h // size, w // size, size, size,
                         windows.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w,
                                                   windows.shape[-1])

    return window_reverse


def _ddq_exportable(det, iou_threshold):
    """DDQ-DETR's main-query selection and decoder with :func:`nms_keep` at
    ``iou_threshold`` (from :func:`~.nms.exportable_iou_threshold`)."""

    def main_queries(context):
        """``DDQDETRPlus.main_queries`` with fixed shapes: the top N of the
        proposals NMS keeps, by score; zeros where fewer survive."""
        enc_class, enc_coord_unact = context.enc_class, context.enc_coord_unact
        boxes = bbox_cxcywh_to_xyxy(enc_coord_unact.sigmoid())
        scores = enc_class.max(-1)[0].sigmoid()
        keep = nms_keep(boxes, scores, iou_threshold)
        take = _top_kept(keep, scores, det.num_queries)
        coords_unact = take(enc_coord_unact)
        main = QuerySet(MAIN, take(context.token_content),
                        coords_unact.detach())
        return main, take(enc_class), coords_unact.sigmoid()

    def forward_decoder(query_sets=None, **decoder_inputs):
        """``DDQDETRPlus.forward_decoder`` with :class:`_DistinctNMS`."""
        selection = _DistinctNMS(det.bbox_head.cls_branches,
                                 query_sets[0].num_queries, det.dqs_cfg,
                                 det.suppressed_queries)
        selection.iou_threshold = iou_threshold
        outputs = DINOPlus.forward_decoder(det, query_sets=query_sets,
                                           between_layers=selection,
                                           **decoder_inputs)
        outputs['query_keep'] = selection.keeps
        return outputs

    return _patched(det, main_queries=main_queries,
                    forward_decoder=forward_decoder)


def _top_kept(keep, scores, num):
    """A function taking the ``num`` best kept items of (B, n, ...) tensors.

    Args:
        keep (Tensor): (B, n) bool.
        scores (Tensor): (B, n), all >= 0.
        num (int): how many to take; missing ones are zeros (mmdet's
            ``align_tensor``), also when n < num.

    Returns:
        callable: (B, n, d) -> (B, num, d).
    """
    ranked = torch.where(keep, scores, scores.new_tensor(-1.0))
    # pad so that topk(num) exists whatever n is
    ranked = torch.cat([ranked, ranked.new_full((ranked.shape[0], num),
                                                -2.0)], 1)
    top, index = ranked.topk(num, dim=1)
    valid = top >= 0
    index = torch.where(valid, index, 0)

    def take(x):
        picked = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
        # (not a product: unused proposals may be inf)
        return torch.where(valid[..., None], picked, picked.new_zeros(()))

    return take


class _DistinctNMS(DistinctQuerySelection):
    """:class:`DistinctQuerySelection` with the fixed-shape NMS op."""

    iou_threshold = None

    def __call__(self, layer_id, query, reference_points, layout):
        n = self.num_main
        scores = self.cls_branches[layer_id](query[:, :n]).sigmoid()
        boxes = bbox_cxcywh_to_xyxy(reference_points[:, :n])
        previous = self.keeps[-1] if self.keeps else None
        keep = nms_keep(boxes, scores.max(-1).values, self.iou_threshold,
                        previous)
        self.keeps.append(keep | keep[:, :1] if self.suppressed == 'mmdet'
                          else keep)
        return self._layout(layout, keep)
