"""Stable-DINO's stable matching: a position-supervised loss and a
position-modulated matching cost.

Stable-DINO (Liu et al., 2023, arXiv 2304.04742, "Detection Transformer
with Stable Matching") changes DINO in four places; two are here, the
others are options:

* **position-supervised loss** (:class:`PositionSupervisedLoss`, set as
  ``bbox_head.loss_cls``): a positive's target is ``t = p ** ta_alpha *
  IoU ** ta_beta`` (0 and 2: the squared IoU of its box), rescaled per image
  so that the image's largest ``t`` becomes 1 (never shrunk), detached;
  positives weigh ``alpha (t - p) ** gamma`` in a BCE towards ``t``,
  negatives are focal, ``(1 - alpha) p ** gamma``.  It serves every set
  the set-loss core computes: decoder layers, encoder proposals and
  denoising (the official ``isdn`` flag is never set);
* **position-modulated matching cost** (:class:`PositionModulatedFocalCost`,
  in ``train_cfg.assigner.match_costs``): the focal cost of ``p' = p *
  u ** beta`` with ``u = (GIoU + 1) / 2``, ``u`` rescaled per image so its
  largest is 1, beta 0.5; every decoder layer and the encoder proposals;
* dense memory fusion: ``model.encoder.type='DenseFusionEncoder'``
  (:mod:`..layers.memory_fusion`);
* denoising negatives noised like the positives (``neg_step_type='none'``):
  ``dn_cfg.negative_noise_offset=0``; its classification weight 1 while the
  matched sets' is 6: ``dn_cfg.loss_cls_weight=1``.

Official code: IDEA-Research/Stable-DINO ``projects/stabledino/``
(``modeling/matcher.py``: ``StableDINOHungarianMatcher``;
``modeling/dn_criterion.py``: ``loss_labels_stabledino``;
``configs/models/stabledino_r50.py``).  Where we differ (deliberately):
the official matcher writes ``u`` into a (queries, classes) table over the
whole batch, so ground truths of one class share a column (the last one's
GIoU is every one's) and an image's rescaling sees the other images' ground
truths; here each ground truth gets its own GIoU and each image is
rescaled on its own (equal where the batch's labels are distinct and no
image's queries overlap another's ground truth better than its own);
``log p`` is ``logsigmoid`` (the official ``p.log()`` is -inf, and the
loss NaN, for logits below about -104).
"""
import torch
import torch.nn.functional as F
from mmdet.models.task_modules.assigners.match_cost import BaseMatchCost
from mmdet.registry import MODELS, TASK_UTILS
from mmdet.structures.bbox import bbox_overlaps

from ..losses.soft_target import SoftTargetLoss


def _rescale_to_one(value, eps=1e-8):
    """``value * max(1 / (max(value) + eps), 1)``: the largest becomes 1
    unless it is above 1 already."""
    return value * (1 / (value.max() + eps)).clamp(min=1)


@MODELS.register_module()
class PositionSupervisedLoss(SoftTargetLoss):
    """Stable-DINO's position-supervised classification loss.

    Args:
        alpha (float): focal alpha (0.25).
        gamma (float): focal gamma (2).
        ta_alpha (float): exponent of the probability in the target (0).
        ta_beta (float): exponent of the IoU in the target (2).
        eps (float): in ``log(1 - p + eps)`` (official 1e-8).
        loss_weight (float): multiplies the loss.
    """

    def __init__(self,
                 alpha=0.25,
                 gamma=2.0,
                 ta_alpha=0.0,
                 ta_beta=2.0,
                 eps=1e-8,
                 loss_weight=1.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma
        self.ta_alpha, self.ta_beta = ta_alpha, ta_beta
        self.eps, self.loss_weight = eps, loss_weight

    def soft_target(self, prob, iou):
        return prob**self.ta_alpha * iou**self.ta_beta

    def image_target(self, quality, image):
        """Each image's targets rescaled so that its largest is 1 (never
        shrunk): ``t * max(1 / (max t + eps), 1)``."""
        if image is None:
            raise ValueError(f'{type(self).__name__} rescales the targets '
                             'per image: SetTargets.images is needed')
        if quality.numel() == 0:
            return quality
        best = quality.new_zeros(int(image.max()) + 1).scatter_reduce(
            0, image, quality, 'amax')  # each image's largest (t >= 0)
        return quality * (1 / (best + self.eps)).clamp(min=1)[image]

    def forward(self, pred, target, weight=None, avg_factor=None):
        """Loss of (M, C) logits for ``target = (labels (M, ), quality
        (M, ))``, rows weighted by ``weight`` (M, ), summed and divided by
        ``avg_factor``."""
        labels, quality = target
        prob = pred.sigmoid()
        log_neg = torch.log(1 - prob + self.eps)
        loss = -(1 - self.alpha) * prob**self.gamma * log_neg
        rows = ((labels >= 0) & (labels < pred.shape[1])).nonzero()[:, 0]
        cols = labels[rows]
        t, p = quality[rows].to(prob.dtype), prob[rows, cols]
        bce = -t * F.logsigmoid(pred[rows, cols]) - \
            (1 - t) * log_neg[rows, cols]
        positive = self.alpha * (t - p)**self.gamma * bce
        loss = loss.index_put((rows, cols), positive)
        if weight is not None:
            loss = loss * weight[:, None]
        return self.loss_weight * loss.sum() / (avg_factor or 1.0)


@TASK_UTILS.register_module()
class PositionModulatedFocalCost(BaseMatchCost):
    """Focal matching cost of the probability modulated by the GIoU.

    One image at a time (the rescaling takes the image's maximum): use it
    with a per-image ``assign``, not ``OneToOneAssigner.assign_batch``.

    Args:
        weight (float): cost weight (official ``cost_class`` 2).
        alpha (float), gamma (float): focal cost parameters (0.25, 2).
        beta (float): exponent of the modulation (official ``cec_beta``
            0.5).
        eps (float): in the logs (official 1e-8).
    """

    def __init__(self, weight=1.0, alpha=0.25, gamma=2.0, beta=0.5, eps=1e-8):
        super().__init__(weight=weight)
        self.alpha, self.gamma, self.beta, self.eps = alpha, gamma, beta, eps

    def __call__(self, pred_instances, gt_instances, img_meta=None, **kwargs):
        """(num_queries, num_gts) cost: ``pred_instances.scores`` logits,
        ``bboxes`` xyxy; ``gt_instances.bboxes`` xyxy and ``labels``."""
        giou = bbox_overlaps(
            pred_instances.bboxes, gt_instances.bboxes, mode='giou')
        position = _rescale_to_one((giou + 1) / 2) if giou.numel() else giou
        prob = pred_instances.scores.sigmoid()[:, gt_instances.labels]
        prob = prob * position**self.beta
        neg = (1 -
               self.alpha) * prob**self.gamma * -torch.log(1 - prob + self.eps)
        pos = self.alpha * (1 - prob)**self.gamma * -torch.log(prob + self.eps)
        return (pos - neg) * self.weight
