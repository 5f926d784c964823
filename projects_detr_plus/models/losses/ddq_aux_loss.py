"""mmdet's ``DDQAuxLoss`` with each image's allowed matches as an argument.

DDQ FCN's one-to-one loss may restrict which (prediction, gt) pairs can
match (``positives_near_centre``).  mmdet 3.3's ``DDQAuxLoss`` assigns in
``_get_target_single`` with ``assigner.assign(scores, boxes, gt_bboxes,
gt_labels, img_meta)`` and passes nothing else on;
:class:`DDQAuxLossPlus` takes ``allowed`` in :meth:`~DDQAuxLossPlus.loss`
and hands each image's matrix to
``TopkHungarianAssignerPlus.assign(..., allowed=)``.  Targets and losses are
mmdet's own code.
"""
from mmdet.models.losses import DDQAuxLoss
from mmdet.models.utils import multi_apply
from mmdet.utils import reduce_mean

__all__ = ['DDQAuxLossPlus']


class DDQAuxLossPlus(DDQAuxLoss):
    """``DDQAuxLoss`` whose :meth:`loss` takes per-image allowed matches
    (its assigner must take ``allowed=``, as ``TopkHungarianAssignerPlus``
    does).

    Args:
        **kwargs: as ``DDQAuxLoss`` (``loss_cls``, ``loss_bbox``,
            ``train_cfg``); ``train_cfg``'s alignment ``alpha`` / ``beta``
            must be mmdet's 1 / 6, which mmdet 3.3 uses whatever it says.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        metric = (self.train_cfg.get('alpha',
                                     1), self.train_cfg.get('beta', 6))
        if metric != (1, 6):  # mmdet 3.3 does not pass them on
            raise ValueError('mmdet 3.3 DDQAuxLoss assigns with alignment '
                             'alpha=1, beta=6 whatever its train_cfg says; '
                             f'got {metric}')

    def loss(self,
             cls_scores,
             bbox_preds,
             gt_bboxes,
             gt_labels,
             img_metas,
             allowed=None):
        """As ``DDQAuxLoss.loss``.

        Args:
            cls_scores (list[Tensor]): per image (n_i, C) probabilities.
            bbox_preds (list[Tensor]): per image (n_i, 4), absolute xyxy.
            gt_bboxes (list[Tensor]): per image (G_i, 4), absolute xyxy.
            gt_labels (list[Tensor]): per image (G_i, ).
            img_metas (list[dict]): per image meta information.
            allowed (list[Tensor], optional): per image (n_i, G_i) bool, the
                pairs that may match; None: any pair.

        Returns:
            dict: ``aux_loss_cls`` and ``aux_loss_bbox``, lists of per-image
            losses normalised over the batch.
        """
        if allowed is None:
            allowed = [None] * len(cls_scores)
        targets = multi_apply(self._get_target_single, cls_scores, bbox_preds,
                              gt_bboxes, gt_labels, img_metas, allowed)
        losses_cls, losses_bbox, cls_factors, bbox_factors = multi_apply(
            self.loss_single, cls_scores, bbox_preds, *targets)
        cls_factor = reduce_mean(sum(cls_factors)).clamp_(min=1).item()
        bbox_factor = reduce_mean(sum(bbox_factors)).clamp_(min=1).item()
        return dict(
            aux_loss_cls=[loss / cls_factor for loss in losses_cls],
            aux_loss_bbox=[loss / bbox_factor for loss in losses_bbox])

    def _get_target_single(self,
                           cls_scores,
                           bbox_preds,
                           gt_bboxes,
                           gt_labels,
                           img_meta,
                           allowed=None):
        """mmdet's targets of one image, its assigner called with
        ``allowed`` (bound for the call: mmdet's body calls
        ``self.assigner.assign`` with the five arguments only)."""
        if allowed is None:
            return super()._get_target_single(cls_scores, bbox_preds,
                                              gt_bboxes, gt_labels, img_meta)
        assigner = self.assigner
        self.assigner = _WithAllowed(assigner, allowed)
        try:
            return super()._get_target_single(cls_scores, bbox_preds,
                                              gt_bboxes, gt_labels, img_meta)
        finally:
            self.assigner = assigner


class _WithAllowed:
    """An assigner whose ``assign`` always gets ``allowed=allowed``."""

    def __init__(self, assigner, allowed):
        self.assigner = assigner
        self.allowed = allowed

    def assign(self, *args, **kwargs):
        return self.assigner.assign(*args, allowed=self.allowed, **kwargs)
