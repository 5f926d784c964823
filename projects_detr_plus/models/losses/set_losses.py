"""One loss core for every DETR-style supervision: targets in, losses out.

Supervision = *targets* + *one loss body*.  However a set of queries is
assigned (Hungarian one-to-one, one-to-one per group, against repeated
ground truth, fixed in advance as DINO's denoising or Co-DETR's customized
queries, on a ragged subset as DDQ's distinct queries), the assignment
yields :class:`SetTargets`, and :func:`set_loss` turns (predictions,
targets) into the classification, L1 and IoU terms with DETR's normalisers
(mmdet's ``DETRHead.loss_by_feat_single``, which the official DINO,
Deformable DETR, H-DETR and Co-DETR code share):

* classification: averaged over ``num_pos + bg_cls_weight * num_neg``
  (over ranks with ``head.sync_cls_avg_factor``), at least 1; with
  ``QualityFocalLoss`` a positive's target is its predicted box's IoU, with
  a :class:`~.soft_target.SoftTargetLoss` the loss's quality of it;
* L1 and IoU: averaged over the positives of all ranks, at least 1.

:func:`layer_loss_dict` names per-layer losses as mmdet does.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from mmdet.models.losses import QualityFocalLoss
from mmdet.structures.bbox import (bbox_cxcywh_to_xyxy, bbox_overlaps,
                                   bbox_xyxy_to_cxcywh)
from mmdet.utils import reduce_mean
from mmengine.structures import InstanceData
from torch import Tensor

from .soft_target import SoftTargetLoss


@dataclass
class SetTargets:
    """Per-query targets of M predictions (all images, flattened).

    Attributes:
        labels (Tensor): (M, ) long, ``num_classes`` = background.
        label_weights (Tensor): (M, ) classification weights (0: ignored).
        bbox_targets (Tensor): (M, 4) normalised cxcywh.
        bbox_weights (Tensor): (M, 4), 1 at the positives with a box loss.
        factors (Tensor): (M, 4) the (w, h, w, h) of each query's image.
        num_pos (float): positives (the box normaliser, on this rank).
        cls_avg_factor (float | Tensor): the classification normaliser on
            this rank (DETR: ``num_pos + bg_cls_weight * num_neg``).
        matched_gt (Tensor | None): (M, ) long, the index of each query's
            ground truth in its image (-1: none), when matched.
        images (Tensor | None): (M, ) long, the image of each query (a
            soft target normalised per image needs it).
    """
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    bbox_weights: Tensor
    factors: Tensor
    num_pos: float
    cls_avg_factor: float
    matched_gt: Optional[Tensor] = None
    images: Optional[Tensor] = None


def image_index(sizes, device=None) -> Tensor:
    """(sum sizes, ) long: the image of each row, images of ``sizes``
    rows one after the other."""
    return torch.repeat_interleave(
        torch.arange(len(sizes), device=device),
        torch.tensor(list(sizes), dtype=torch.long, device=device))


def image_factors(boxes_per_image, batch_img_metas) -> Tensor:
    """(sum n_i, 4): the (w, h, w, h) of each image, once per box."""
    return torch.cat([
        boxes.new_tensor([w, h, w, h]).expand(len(boxes), 4)
        for boxes, (h,
                    w) in zip(boxes_per_image, (meta['img_shape'][:2]
                                                for meta in batch_img_metas))
    ])


def set_loss(head, cls_scores: Tensor, bbox_preds: Tensor,
             targets: SetTargets) -> Tuple[Tensor, Tensor, Tensor]:
    """Classification, L1 and IoU losses of M predictions.

    Args:
        head (DETRHead): gives ``loss_cls``, ``loss_bbox``, ``loss_iou``,
            ``num_classes`` and ``sync_cls_avg_factor``.
        cls_scores (Tensor): (M, num_classes) logits.
        bbox_preds (Tensor): (M, 4) normalised cxcywh.
        targets (SetTargets): of the same M queries.

    Returns:
        tuple[Tensor]: ``loss_cls``, ``loss_bbox``, ``loss_iou``.
    """
    cls_avg_factor = targets.cls_avg_factor
    if head.sync_cls_avg_factor:
        cls_avg_factor = reduce_mean(cls_scores.new_tensor([cls_avg_factor]))
    cls_avg_factor = max(cls_avg_factor, 1)
    if len(cls_scores) == 0:
        loss_cls = cls_scores.new_zeros(1)
    else:
        loss_cls = head.loss_cls(
            cls_scores,
            _cls_target(head, cls_scores, bbox_preds, targets),
            targets.label_weights,
            avg_factor=cls_avg_factor)
    num_pos = cls_scores.new_tensor([targets.num_pos])
    num_pos = torch.clamp(reduce_mean(num_pos), min=1).item()
    loss_iou = head.loss_iou(
        bbox_cxcywh_to_xyxy(bbox_preds) * targets.factors,
        bbox_cxcywh_to_xyxy(targets.bbox_targets) * targets.factors,
        targets.bbox_weights,
        avg_factor=num_pos)
    loss_bbox = head.loss_bbox(
        bbox_preds,
        targets.bbox_targets,
        targets.bbox_weights,
        avg_factor=num_pos)
    return loss_cls, loss_bbox, loss_iou


def _cls_target(head, cls_scores, bbox_preds, targets):
    """Labels, or (labels, soft target of each positive): its box's IoU
    for quality focal loss, the loss's own quality for a
    :class:`~.soft_target.SoftTargetLoss` (times the positive's weight)."""
    labels = targets.labels
    soft = isinstance(head.loss_cls, SoftTargetLoss)
    if not soft and not isinstance(head.loss_cls, QualityFocalLoss):
        return labels
    positive = ((labels >= 0) & (labels < head.num_classes)).nonzero()
    positive = positive.squeeze(1)
    quality = targets.label_weights.new_zeros(labels.shape)
    iou = bbox_overlaps(
        bbox_cxcywh_to_xyxy(bbox_preds[positive]).detach(),
        bbox_cxcywh_to_xyxy(targets.bbox_targets[positive]),
        is_aligned=True)
    if soft:
        prob = cls_scores[positive, labels[positive]].detach().sigmoid()
        iou = head.loss_cls.soft_target(prob, iou)
        images = targets.images
        iou = head.loss_cls.image_target(
            iou, None if images is None else images[positive]) * \
            targets.bbox_weights[positive, 0]
    quality[positive] = iou.to(quality.dtype)  # bf16 under CPU autocast
    return labels, quality


def collate_targets(per_image,
                    boxes_per_image,
                    batch_img_metas,
                    bg_cls_weight: float = 0.0) -> SetTargets:
    """:class:`SetTargets` of per-image (labels, label_weights,
    bbox_targets, bbox_weights (n_i, 4), num_pos, num_neg[, matched_gt]).
    """
    labels, label_weights, bbox_targets, bbox_weights, pos, neg = zip(
        *[image[:6] for image in per_image])
    num_pos, num_neg = sum(pos), sum(neg)
    matched = None
    if all(len(image) > 6 for image in per_image):
        matched = torch.cat([image[6] for image in per_image])
    return SetTargets(
        torch.cat(labels), torch.cat(label_weights), torch.cat(bbox_targets),
        torch.cat(bbox_weights), image_factors(boxes_per_image,
                                               batch_img_metas), num_pos,
        num_pos * 1.0 + num_neg * bg_cls_weight, matched,
        image_index([len(b) for b in boxes_per_image], labels[0].device))


def matched_targets(head, cls_scores: List[Tensor], bbox_preds: List[Tensor],
                    batch_gt_instances, batch_img_metas,
                    **assign_args) -> SetTargets:
    """Targets from ``head.assigner`` (mmdet's ``DETRHead.get_targets``).

    Args:
        cls_scores (list[Tensor]): per image, (n_i, num_classes) logits.
        bbox_preds (list[Tensor]): per image, (n_i, 4) normalised cxcywh.
        batch_gt_instances (list[InstanceData]), batch_img_metas (list[dict]).
        **assign_args: passed to every ``assign`` call (a branch's own
            data: ``num_groups`` of Group DETR).
    """
    per_image = [
        _match_image(head, scores, boxes, gt, meta, assign_args)
        for scores, boxes, gt, meta in zip(cls_scores, bbox_preds,
                                           batch_gt_instances, batch_img_metas)
    ]
    return collate_targets(per_image, bbox_preds, batch_img_metas,
                           head.bg_cls_weight)


def _match_image(head, cls_score, bbox_pred, gt_instances, img_meta,
                 assign_args):
    """One image's targets, as ``DETRHead._get_targets_single``."""
    img_h, img_w = img_meta['img_shape'][:2]
    factor = bbox_pred.new_tensor([img_w, img_h, img_w, img_h])[None]
    pred = InstanceData(
        scores=cls_score, bboxes=bbox_cxcywh_to_xyxy(bbox_pred) * factor)
    result = head.assigner.assign(
        pred_instances=pred,
        gt_instances=gt_instances,
        img_meta=img_meta,
        **assign_args)
    pos = torch.nonzero(result.gt_inds > 0).squeeze(-1).unique()
    neg = torch.nonzero(result.gt_inds == 0).squeeze(-1).unique()
    matched = result.gt_inds[pos] - 1
    gt_bboxes = gt_instances.bboxes
    labels = gt_bboxes.new_full((len(bbox_pred), ),
                                head.num_classes,
                                dtype=torch.long)
    labels[pos] = gt_instances.labels[matched]
    bbox_targets = torch.zeros_like(bbox_pred, dtype=gt_bboxes.dtype)
    bbox_weights = torch.zeros_like(bbox_pred, dtype=gt_bboxes.dtype)
    bbox_weights[pos] = 1.0
    bbox_targets[pos] = bbox_xyxy_to_cxcywh(gt_bboxes[matched.long()] / factor)
    matched_gt = labels.new_full((len(bbox_pred), ), -1)
    matched_gt[pos] = matched.long()
    return (labels, gt_bboxes.new_ones(len(bbox_pred)), bbox_targets,
            bbox_weights, len(pos), len(neg), matched_gt)


def fixed_targets(labels: Tensor, bbox_targets: Tensor, weights: Tensor,
                  bbox_weights: Tensor, batch_img_metas,
                  num_classes: int) -> SetTargets:
    """Targets assigned in advance (no matching), batched.

    Args:
        labels (Tensor): (bs, n) class of each query's target.
        bbox_targets (Tensor): (bs, n, 4) normalised cxcywh.
        weights (Tensor): (bs, n) classification weight, 0 for padding
            (whose label becomes background).
        bbox_weights (Tensor): (bs, n), 1 at the positives.
        batch_img_metas (list[dict]): per image, with ``img_shape``.
        num_classes (int): the background label.

    Both normalisers are the number of positives (Co-DETR's customized
    queries: their negatives do not count).
    """
    labels = torch.where(weights > 0, labels, labels.new_full((), num_classes))
    num_pos = bbox_weights.sum().item()
    return SetTargets(
        labels.reshape(-1),
        weights.reshape(-1),
        bbox_targets.reshape(-1, 4),
        bbox_weights.reshape(-1, 1).expand(-1, 4),
        image_factors(list(bbox_targets), batch_img_metas),
        num_pos,
        num_pos,
        images=image_index([labels.shape[1]] * len(labels), labels.device))


def layer_losses(head,
                 cls_scores: Tensor,
                 bbox_preds: Tensor,
                 targets,
                 keeps=None) -> dict:
    """Per-layer ``loss_cls``/``loss_bbox``/``loss_iou`` lists.

    Args:
        cls_scores (Tensor): (num_layers, bs, n, num_classes).
        bbox_preds (Tensor): (num_layers, bs, n, 4).
        targets (SetTargets | callable): the targets of every layer, or a
            function ``(layer_cls, layer_bbox, keep) -> SetTargets`` (matched
            per layer).
        keeps (list[Tensor | None], optional): per layer, (bs, n) bool:
            the queries that layer is trained on; None: all.
    """
    per_layer = dict(loss_cls=[], loss_bbox=[], loss_iou=[])
    keeps = keeps or [None] * len(cls_scores)
    for layer_cls, layer_bbox, keep in zip(cls_scores, bbox_preds, keeps):
        layer_targets = targets(layer_cls, layer_bbox,
                                keep) if callable(targets) else targets
        flat_cls, flat_bbox = _flatten(layer_cls, layer_bbox, keep)
        for key, loss in zip(
                per_layer, set_loss(head, flat_cls, flat_bbox, layer_targets)):
            per_layer[key].append(loss)
    return per_layer


def _flatten(cls_scores, bbox_preds, keep):
    """(bs, n, C), (bs, n, 4) -> (M, C), (M, 4), over the kept queries."""
    if keep is None:
        return (cls_scores.reshape(-1, cls_scores.shape[-1]),
                bbox_preds.reshape(-1, 4))
    return cls_scores[keep], bbox_preds[keep]


def per_image(x: Tensor, keep: Optional[Tensor]) -> List[Tensor]:
    """The rows of each image of (bs, n, ...) ``x``, the kept ones only."""
    return list(x) if keep is None else [xi[k] for xi, k in zip(x, keep)]


def matched_set_loss(head,
                     prefix: str,
                     cls_scores: Tensor,
                     bbox_preds: Tensor,
                     batch_gt_instances,
                     batch_img_metas,
                     loss_weight: float = 1.0,
                     keeps=None,
                     normaliser=None,
                     **assign_args) -> dict:
    """``head.assigner``'s matching and the set loss, every layer, named.

    Args:
        prefix (str): loss-key prefix, e.g. ``'group_'``.
        cls_scores (Tensor): (num_layers, bs, n, num_classes).
        bbox_preds (Tensor): (num_layers, bs, n, 4), normalised cxcywh.
        loss_weight (float): multiplies every loss.
        keeps (list[Tensor | None], optional): see :func:`layer_losses`.
        normaliser (float, optional): divides every loss instead of the
            number of matched queries (mmdet's): e.g. the number of targets,
            as the official DETR criteria (they differ when an image has
            more targets than queries).
        **assign_args: see :func:`matched_targets`.
    """

    def match(layer_cls, layer_bbox, keep):
        targets = matched_targets(head, per_image(layer_cls, keep),
                                  per_image(layer_bbox,
                                            keep), batch_gt_instances,
                                  batch_img_metas, **assign_args)
        if normaliser is not None:
            targets.num_pos = targets.cls_avg_factor = float(normaliser)
        return targets

    per_layer = layer_losses(head, cls_scores, bbox_preds, match, keeps)
    return layer_loss_dict(prefix, per_layer, loss_weight)


def layer_loss_dict(prefix: str,
                    losses_per_layer: dict,
                    loss_weight: float = 1.0) -> dict:
    """Name per-decoder-layer losses as mmdet does.

    ``{'loss_cls': [l0, l1, l2]}`` with prefix ``'dn_'`` becomes
    ``{'dn_loss_cls': l2, 'd0.dn_loss_cls': l0, 'd1.dn_loss_cls': l1}``,
    each times ``loss_weight``.
    """
    named = {}
    for key, per_layer in losses_per_layer.items():
        if loss_weight != 1.0:
            per_layer = [loss * loss_weight for loss in per_layer]
        named[f'{prefix}{key}'] = per_layer[-1]
        for layer_id, value in enumerate(per_layer[:-1]):
            named[f'd{layer_id}.{prefix}{key}'] = value
    return named
