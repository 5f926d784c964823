"""FCOS as a Co-DETR auxiliary head: mmdet's head, plus its positives."""
import torch
from mmdet.models.dense_heads import FCOSHead
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from .atss import features_at_priors


@MODELS.register_module()
class CoFCOSHead(FCOSHead):
    """mmdet's ``FCOSHead`` (points inside a box, or its centre region with
    ``center_sampling``, within the level's size range are positive) whose
    points also become decoder queries.

    A point has no box, so its query starts from a square centred on it of
    side ``prior_scale * stride`` (like an ATSS anchor at octave scale 8).

    Args:
        prior_scale (float): side of the point's box in strides.
        **kwargs: as ``FCOSHead``.
    """

    def __init__(self, *args, prior_scale=8.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior_scale = prior_scale

    def loss_and_candidates(self, feats, batch_data_samples, with_feats=False):
        """Losses of the head and, per image, every point with its
        target."""
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        outs = self(feats)
        losses = self.loss_by_feat(*outs, gts, metas)
        return losses, self.candidates(outs[0], gts,
                                       feats if with_feats else None)

    def candidates(self, cls_scores, batch_gt_instances, feats=None):
        """Per image: point boxes, their gt boxes (xyxy), labels
        (background = ``num_classes``) and, given the pyramid ``feats``,
        the features at the points."""
        sizes = [c.shape[-2:] for c in cls_scores]
        if len(sizes) != len(self.strides):
            raise ValueError(f'CoFCOSHead has {len(self.strides)} strides for '
                             f'a {len(sizes)}-level pyramid (encoder levels '
                             '+ 1)')
        points = self.prior_generator.grid_priors(
            sizes, dtype=cls_scores[0].dtype, device=cls_scores[0].device)
        with torch.no_grad():
            labels, targets = self.get_targets(points, batch_gt_instances)
        num_imgs = cls_scores[0].shape[0]
        per_level = []
        for level, (lvl_points,
                    stride) in enumerate(zip(points, self.strides)):
            ltrb = targets[level].reshape(num_imgs, -1, 4)
            if self.norm_on_bbox:
                ltrb = ltrb * stride
            xy = lvl_points[None].expand(num_imgs, -1, -1)
            half = self.prior_scale * stride / 2
            per_level.append(
                (torch.cat([xy - half, xy + half], -1),
                 torch.cat([xy - ltrb[..., :2], xy + ltrb[..., 2:]],
                           -1), labels[level].reshape(num_imgs, -1)))
        priors, boxes, labels = (torch.cat(x, 1) for x in zip(*per_level))
        result = [
            InstanceData(priors=p, bboxes=b, labels=lab)
            for p, b, lab in zip(priors, boxes, labels)
        ]
        if feats is not None:
            located = features_at_priors(feats, [1] * len(feats))
            for candidates, img_feats in zip(result, located):
                candidates.feats = img_feats
        return result
