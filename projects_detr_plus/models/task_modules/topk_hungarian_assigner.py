"""DDQ's one-to-k Hungarian assigner, scoring classification on logits.

mmdet 3.3's ``TopkHungarianAssigner`` hands the predicted *probabilities*
to ``FocalLossCost``, which applies a sigmoid again: the classification cost
collapses (about 7x smaller) against the box costs.  The released DDQ code
(``jshilong/DDQ``, ``projects/models/loss_module.py``) passes
``inverse_sigmoid(pred_scores)``; this subclass does the same.

It can also restrict the matches: ``assign(..., allowed=)`` takes a
``(num_preds, num_gts)`` bool matrix (DDQ R-CNN's seed option: only the 9
points nearest each object's centre per level may be positives).  Pairs
outside it get a prohibitive cost and, if the Hungarian solver still needs
one (too few allowed predictions), the match is dropped: a forbidden pair
never becomes a positive.
"""
from mmdet.models.layers.transformer import inverse_sigmoid
from mmdet.models.task_modules.assigners import TopkHungarianAssigner
from mmdet.registry import TASK_UTILS
from mmengine.structures import InstanceData

FORBIDDEN_COST = 1e6


class _ClassificationOnLogits:
    """A match cost called with logits instead of probabilities, plus the
    forbidden-pair penalty of ``allowed`` ((N, G) bool), which
    :meth:`TopkHungarianAssignerPlus.assign` sets for the one call (mmdet's
    ``assign`` calls its costs with ``img_meta`` only)."""

    def __init__(self, cost, on_logits):
        self.cost = cost
        self.on_logits = on_logits
        self.allowed = None

    def __call__(self, pred_instances, gt_instances, img_meta=None, **kw):
        if self.on_logits:
            pred_instances = InstanceData(
                scores=inverse_sigmoid(pred_instances.scores, eps=1e-5),
                bboxes=pred_instances.bboxes)
        cost = self.cost(pred_instances, gt_instances, img_meta, **kw)
        if self.allowed is not None:
            cost = cost + (~self.allowed).to(cost.dtype) * FORBIDDEN_COST
        return cost


@TASK_UTILS.register_module()
class TopkHungarianAssignerPlus(TopkHungarianAssigner):
    """mmdet's ``TopkHungarianAssigner`` as the released DDQ code runs it.

    Args:
        cls_cost_on_logits (bool): give the classification cost
            ``inverse_sigmoid(scores)`` (official DDQ); False reproduces
            mmdet 3.3's double sigmoid.
        *args, **kwargs: as ``TopkHungarianAssigner`` (``topk``,
            ``cls_cost``, ``reg_cost``, ``iou_cost``).
    """

    def __init__(self, *args, cls_cost_on_logits=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.cls_cost = _ClassificationOnLogits(self.cls_cost,
                                                cls_cost_on_logits)

    def assign(self,
               pred_scores,
               decode_bboxes,
               gt_bboxes,
               gt_labels,
               img_meta,
               alpha=1,
               beta=6,
               allowed=None,
               **kwargs):
        """As ``TopkHungarianAssigner.assign``; (N, C) probabilities,
        (N, 4) and (G, 4) absolute xyxy boxes, (G, ) labels.

        Args:
            allowed (Tensor, optional): (N, G) bool, the (prediction, gt)
                pairs that may match; None: any pair.
        """
        self.cls_cost.allowed = allowed
        try:
            result = super().assign(pred_scores, decode_bboxes, gt_bboxes,
                                    gt_labels, img_meta, alpha, beta, **kwargs)
        finally:
            self.cls_cost.allowed = None
        if allowed is None or len(gt_labels) == 0:
            return result
        return _drop_forbidden(result, allowed)


def _drop_forbidden(result, allowed):
    """``result`` without its positives outside ``allowed`` (N, G)."""
    positives = (result.gt_inds > 0).nonzero(as_tuple=True)[0]
    ok = allowed[positives, result.gt_inds[positives] - 1]
    if bool(ok.all()):
        return result
    dropped = positives[~ok]
    result.gt_inds[dropped] = 0
    result.labels[dropped] = -1
    # per-positive values, in the ascending order of ``positives``
    result.max_overlaps = result.max_overlaps[ok]
    result.assign_metrics = result.assign_metrics[ok]
    return result


__all__ = ['TopkHungarianAssignerPlus']
