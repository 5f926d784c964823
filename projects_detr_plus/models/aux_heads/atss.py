"""ATSS as a Co-DETR auxiliary head: mmdet's head, plus its candidates."""
import torch
from mmdet.models.dense_heads import ATSSHead
from mmdet.registry import MODELS
from mmengine.structures import InstanceData


@MODELS.register_module()
class CoATSSHead(ATSSHead):
    """mmdet's ``ATSSHead`` (ATSS assignment: per level the top-k anchors
    nearest each box, kept when their IoU exceeds mean + std) whose anchors
    also become decoder queries."""

    def loss_and_candidates(self, feats, batch_data_samples, with_feats=False):
        """Losses of the head and, per image, every anchor with its target.

        The targets are computed a second time (mmdet's ``loss_by_feat``
        does not return them); ATSS assignment is deterministic, so these
        are the ones the losses used.  With ``reg_decoded_bbox=False`` the
        gt boxes are decoded back from the regression targets (exact up to
        the coder's ``wh_ratio_clip``).
        """
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        outs = self(feats)
        losses = self.loss_by_feat(*outs, gts, metas)
        return losses, self.candidates(outs[1], gts, metas,
                                       feats if with_feats else None)

    def candidates(self,
                   bbox_preds,
                   batch_gt_instances,
                   batch_img_metas,
                   feats=None):
        """Per image: all anchors, their labels (background =
        ``num_classes``), gt boxes and, given the pyramid ``feats``, the
        features at their locations."""
        sizes = [p.shape[-2:] for p in bbox_preds]
        anchors, valid = self.get_anchors(
            sizes, batch_img_metas, device=bbox_preds[0].device)
        with torch.no_grad():
            (anchors, labels, _, targets, _,
             _) = self.get_targets(anchors, valid, batch_gt_instances,
                                   batch_img_metas)
        anchors, labels, targets = (
            torch.cat(x, dim=1) for x in (anchors, labels, targets))
        if not self.reg_decoded_bbox:
            targets = self.bbox_coder.decode(anchors, targets)
        result = [
            InstanceData(priors=a, bboxes=t, labels=lab)
            for a, t, lab in zip(anchors, targets, labels)
        ]
        if feats is not None:
            located = features_at_priors(feats,
                                         self.prior_generator.num_base_priors)
            for candidates, img_feats in zip(result, located):
                candidates.feats = img_feats
        return result


def features_at_priors(feats, priors_per_location):
    """(bs, A, dim): each prior's feature, for the priors of mmdet's
    generators (level by level, row-major, the priors of one location
    consecutive).

    Args:
        feats (tuple[Tensor]): (bs, dim, h, w) per level.
        priors_per_location (list[int]): per level.
    """
    return torch.cat([
        level.flatten(2).transpose(1, 2).repeat_interleave(count, dim=1)
        for level, count in zip(feats, priors_per_location)
    ],
                     dim=1)
