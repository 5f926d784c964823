"""Align-DETR's supervision of the main queries: one-to-k and IA-BCE.

Align-DETR (Cai et al., 2023, arXiv 2304.07527, "Align-DETR: Improving
DETR with Simple IoU-aware BCE loss") changes DINO's training only:

* **IA-BCE** (:class:`IABCELoss`, set as ``bbox_head.loss_cls``): a
  positive's classification target is ``t = p ** alpha * IoU ** (1 -
  alpha)`` (``p`` its predicted probability, detached, ``t`` at least
  0.01), a binary cross-entropy with that soft target; negatives weigh
  ``p ** gamma`` (``losses.py``: ``IA_BCE_loss``).  It serves every set the
  set-loss core computes: decoder layers, encoder proposals, denoising;
* **one-to-k matching** (:class:`AlignDETRBranch`): the encoder proposals
  and the decoder layers but the last are matched one-to-k (Hungarian
  against the ground truth repeated k = 2 times; ``mixed_matcher.py``), the
  last layer one-to-one (``match_num = [2, 2, 2, 2, 2, 2, 1]``: encoder,
  layers 0-5);
* **sample weighting**: the k matches of a ground truth are ranked by
  ``t``; rank r weighs ``exp(-r / tau)`` (tau = 1.5), in the soft target and
  in the L1 and GIoU losses (``many_to_one_criterion.py``);
* every loss of a matched set is normalised by the number of ground-truth
  boxes (not of matches).

Official code: IDEA-Research/detrex ``projects/align_detr/`` (``modeling/
losses/losses.py``, ``modeling/matchers/mixed_matcher.py``, ``modeling/
criterions/many_to_one_criterion.py``, ``configs/aligndetr_k=2_r50_
4scale_12ep.py``).  Where we differ (deliberately): an image with more
than ``n / (2 k)`` ground truths gets fewer copies (``n / 2`` matches at
most), as the official cap, but later images of the batch keep their k (the
official loop carries the smaller k over); logs are ``logsigmoid`` (the
official ``prob.log()`` is -inf for logits below about -104).
"""
import torch
import torch.nn.functional as F
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from mmengine.structures import InstanceData

from ..losses.set_losses import (layer_loss_dict, matched_targets, per_image,
                                 set_loss)
from ..losses.soft_target import SoftTargetLoss
from .protocol import QueryBranch


@MODELS.register_module()
class IABCELoss(SoftTargetLoss):
    """Align-DETR's IoU-aware binary cross-entropy.

    Args:
        alpha (float): weight of the probability in the quality (0.25).
        gamma (float): exponent of the negatives' weight ``p ** gamma`` (2).
        min_quality (float): the quality's floor (0.01).
        loss_weight (float): multiplies the loss.
    """

    def __init__(self,
                 alpha=0.25,
                 gamma=2.0,
                 min_quality=0.01,
                 loss_weight=1.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma
        self.min_quality, self.loss_weight = min_quality, loss_weight

    def soft_target(self, prob, iou):
        return (prob**self.alpha *
                iou**(1 - self.alpha)).clamp(min=self.min_quality)

    def forward(self, pred, target, weight=None, avg_factor=None):
        """Loss of (M, C) logits for ``target = (labels (M, ), quality
        (M, ))``, rows weighted by ``weight`` (M, ), summed and divided by
        ``avg_factor``."""
        labels, quality = target
        positive = (labels >= 0) & (labels < pred.shape[1])
        onehot = torch.zeros_like(pred)
        onehot[positive, labels[positive]] = 1.0
        pos_weight = onehot * quality[:, None]
        neg_weight = pred.sigmoid() ** self.gamma * (1 - onehot) + \
            onehot * (1 - quality[:, None])
        loss = -pos_weight * F.logsigmoid(pred) - \
            neg_weight * F.logsigmoid(-pred)
        if weight is not None:
            loss = loss * weight[:, None]
        return self.loss_weight * loss.sum() / (avg_factor or 1.0)


@MODELS.register_module()
class AlignDETRBranch(QueryBranch):
    """One-to-k matching with rank weights for the main queries and the
    encoder proposals (replaces the detector's one-to-one loss).

    Args:
        match_numbers (tuple[int]): k of the encoder proposals, then of
            each decoder layer (official ``match_num``).
        tau (float): rank weights ``exp(-r / tau)`` (official ``tau``).
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector.
    """
    name = 'align'
    replaces_main_loss = True

    def __init__(self,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 match_numbers=(2, 2, 2, 2, 2, 2, 1),
                 tau=1.5):
        super().__init__()
        if min(match_numbers) < 1:
            raise ValueError(f'match_numbers must be >= 1: {match_numbers}')
        self.match_numbers = tuple(match_numbers)
        self.tau = tau

    def rank_weights(self, k):
        """(k, ) weight of the matches ranked 0 .. k - 1."""
        return torch.exp(-torch.arange(k, dtype=torch.float) / self.tau)

    def supervise_main(self, detector, predictions, batch_data_samples):
        num_layers = predictions.num_layers
        if len(self.match_numbers) != num_layers + 1:
            raise ValueError(
                f'{self.name}: {len(self.match_numbers)} match_numbers for '
                f'the encoder and {num_layers} decoder layers')
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        per_layer = dict(loss_cls=[], loss_bbox=[], loss_iou=[])
        for layer in range(num_layers):
            losses = self.one_to_k_loss(detector.bbox_head,
                                        predictions.cls_scores[layer],
                                        predictions.bbox_preds[layer], gts,
                                        metas, self.match_numbers[layer + 1],
                                        predictions.layer_keep(layer))
            for key, loss in zip(per_layer, losses):
                per_layer[key].append(loss)
        return layer_loss_dict('', per_layer)

    def supervise_encoder(self, detector, enc_cls, enc_coord,
                          batch_data_samples):
        gts = detector.encoder_gt_instances(
            [s.gt_instances for s in batch_data_samples])
        losses = self.one_to_k_loss(detector.bbox_head, enc_cls, enc_coord,
                                    gts,
                                    [s.metainfo for s in batch_data_samples],
                                    self.match_numbers[0])
        return dict(
            zip(('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'), losses))

    def one_to_k_loss(self,
                      head,
                      cls_scores,
                      bbox_preds,
                      gts,
                      metas,
                      k,
                      keep=None):
        """Set loss of (bs, n, C) logits and (bs, n, 4) boxes (the rows
        ``keep`` (bs, n) keeps) matched one-to-k, rank-weighted."""
        cls_list, box_list = per_image(cls_scores, keep), \
            per_image(bbox_preds, keep)
        repeated = [
            InstanceData.cat([gt] * self._copies(gt, len(c), k))
            for gt, c in zip(gts, cls_list)
        ]
        targets = matched_targets(head, cls_list, box_list, repeated, metas)
        flat_cls, flat_box = torch.cat(cls_list), torch.cat(box_list)
        weight = self._match_weights(head, flat_cls, flat_box, targets,
                                     [len(gt) for gt in gts], k)
        targets.bbox_weights = weight[:, None].expand(-1, 4)
        targets.num_pos = targets.cls_avg_factor = float(
            sum(len(gt) for gt in gts))
        return set_loss(head, flat_cls, flat_box, targets)

    @staticmethod
    def _copies(gt, num_queries, k):
        """k, or fewer so that at most half the queries are matched."""
        return max(1, min(int(num_queries * 0.5 /
                              len(gt)), k)) if len(gt) else k

    def _match_weights(self, head, cls_scores, bbox_preds, targets, num_gts,
                       k):
        """(M, ) rank weight of each match (0 for the unmatched): the k
        matches of a ground truth ranked by their quality ``t``."""
        matched = targets.matched_gt
        positive = (matched >= 0).nonzero().squeeze(1)
        image = targets.images[positive]
        gt = matched[positive] % torch.tensor(
            num_gts, device=matched.device).clamp(min=1)[image]
        key = image * (max(num_gts) + 1) + gt
        labels = targets.labels[positive]
        iou = bbox_overlaps(
            bbox_cxcywh_to_xyxy(bbox_preds[positive]).detach(),
            bbox_cxcywh_to_xyxy(targets.bbox_targets[positive]),
            is_aligned=True)
        quality = iou
        if isinstance(head.loss_cls, SoftTargetLoss):
            prob = cls_scores[positive, labels].detach().sigmoid()
            quality = head.loss_cls.soft_target(prob, iou)
        rank = _rank_within(key, quality)
        weight = cls_scores.new_zeros(len(cls_scores))
        weight[positive] = self.rank_weights(k).to(weight)[rank]
        return weight


def _rank_within(key, value):
    """Rank of each element among those of its ``key`` by ``value``,
    descending (ties: in order)."""
    order = torch.argsort(value, descending=True, stable=True)
    order = order[torch.argsort(key[order], stable=True)]
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=key.device) - starts
    return rank
