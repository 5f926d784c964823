"""MS-DETR's one-to-many assigner of the main queries (``Stage2Assigner``).

Official: Atten4Vis/MS-DETR ``impl_a/models/matcher_o2m.py`` (from DETA's
``assigner.py``), with its defaults ``threshold=0.4, k=6, coef_box=0.7,
coef_cls=0.3`` and a positive fraction of 0.25.  For one image:

1. score ``S[g, q] = 0.7 IoU(q, g) + 0.3 sigmoid(logit[q, label_g])``
   (no gradient; boxes normalised, IoU without the GIoU term);
2. a query is positive if its best score (over the ground truths) is at
   least ``threshold``, and every ground truth's best query is positive
   too (``allow_low_quality_matches``); each positive belongs to its best
   ground truth (also a low-quality one: to its own best, as detectron2);
3. ``int(0.25 n)`` positives at most are sampled at random
   (``torch.randperm`` of the positives, *then of the negatives*, whose
   order is never used: two draws per call from the global generator, as
   the official ``subsample_labels``);
4. a ground truth with ``c`` sampled positives gets its top ``min(c, k)``
   queries by score *among all queries* (not its positives): a query may be
   matched to several ground truths.

Deliberate differences: fewer than ``k`` queries take them all (the
official ``topk(k)`` raises); an image without ground truth has no pairs
and draws nothing (the official ``view`` raises); a ground-truth label of
400 is a label (the official sampler takes it for background).
"""
import torch
from mmdet.registry import TASK_UTILS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps


@TASK_UTILS.register_module()
class MSDETRAssigner:
    """Pairs (query, ground truth) of MS-DETR's one-to-many supervision.

    Args:
        k (int): matches per ground truth at most (official ``k=6``).
        threshold (float): the positives' score (official ``0.4``).
        iou_weight (float): IoU's weight in the score (``coef_box=0.7``).
        cls_weight (float): the probability's (``coef_cls=0.3``).
        positive_fraction (float): positives at most, as a fraction of the
            queries (official ``positive_fraction = 0.25``).
    """

    def __init__(self,
                 k=6,
                 threshold=0.4,
                 iou_weight=0.7,
                 cls_weight=0.3,
                 positive_fraction=0.25):
        self.k, self.threshold = k, threshold
        self.iou_weight, self.cls_weight = iou_weight, cls_weight
        self.positive_fraction = positive_fraction

    @torch.no_grad()
    def scores(self, cls_scores, bbox_preds, gt_bboxes, gt_labels):
        """(G, n) score of each ground truth and query.

        Args:
            cls_scores (Tensor): (n, C) logits.
            bbox_preds (Tensor): (n, 4) normalised cxcywh.
            gt_bboxes (Tensor): (G, 4) normalised cxcywh.
            gt_labels (Tensor): (G, ) long.
        """
        iou = bbox_overlaps(
            bbox_cxcywh_to_xyxy(bbox_preds.detach()),
            bbox_cxcywh_to_xyxy(gt_bboxes))
        prob = cls_scores.detach().sigmoid()[:, gt_labels]
        return (self.iou_weight * iou + self.cls_weight * prob).T

    def positives(self, score):
        """(n, ) bool positives and (n, ) long best ground truth of each
        query, of a (G, n) score with G > 0."""
        best, best_gt = score.max(dim=0)
        positive = best >= self.threshold
        positive[score.topk(1, dim=1)[1].flatten()] = True
        return positive, best_gt

    @torch.no_grad()
    def assign(self, cls_scores, bbox_preds, gt_bboxes, gt_labels):
        """Pairs of one image (arguments as :meth:`scores`).

        Returns:
            tuple[Tensor, Tensor]: (P, ) query and (P, ) ground-truth
            indices, ascending by score as the official order (a query of
            several ground truths: its last pair is its best).
        """
        num_queries, num_gts = len(cls_scores), len(gt_labels)
        if num_gts == 0 or num_queries == 0:
            empty = gt_labels.new_zeros(0, dtype=torch.long)
            return empty, empty
        score = self.scores(cls_scores, bbox_preds, gt_bboxes, gt_labels)
        positive, best_gt = self.positives(score)
        pos = positive.nonzero().squeeze(1)
        neg = (~positive).nonzero().squeeze(1)
        cap = min(len(pos), int(num_queries * self.positive_fraction))
        sampled = pos[torch.randperm(len(pos), device=pos.device)[:cap]]
        torch.randperm(len(neg), device=neg.device)  # the official draw
        count = torch.bincount(best_gt[sampled], minlength=num_gts)
        k = min(self.k, num_queries)
        top_score, top_query = score.topk(k, dim=1)
        take = torch.arange(k, device=score.device)[None] < count[:, None]
        gts = torch.arange(num_gts, device=score.device)[:, None].expand(-1, k)
        order = top_score[take].argsort(stable=True)
        return top_query[take][order], gts[take][order]
