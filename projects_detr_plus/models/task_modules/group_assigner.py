"""One-to-one matching inside each query group (Group DETR).

A Group DETR image has ``K`` groups of ``N`` queries, each matched one-to-one
to the same ground truth.  :class:`GroupOneToOneAssigner` computes the
(K * N, G) cost matrix of an image once, copies it to the host once, and
solves one Hungarian problem per (N, G) group block.  Every group matches
``min(N, G)`` queries, so a loss normalised by the number of positives is
normalised by ``K`` times the number of ground truths.

The number of groups is an argument of :meth:`assign` (the set-loss core
passes a branch's ``num_groups`` through); with one group it is the plain
one-to-one assigner.
"""
from typing import Optional

import torch
from mmdet.models.task_modules.assigners import AssignResult
from mmdet.registry import TASK_UTILS
from mmengine.structures import InstanceData

from .one_to_one_assigner import OneToOneAssigner


@TASK_UTILS.register_module()
class GroupOneToOneAssigner(OneToOneAssigner):
    """Hungarian matching per group of queries, one cost matrix per image.

    Args:
        match_costs (dict | list[dict]): as :class:`OneToOneAssigner`.
    """

    def assign(self,
               pred_instances: InstanceData,
               gt_instances: InstanceData,
               img_meta: Optional[dict] = None,
               num_groups: int = 1,
               **kwargs) -> AssignResult:
        """Assign ``K`` groups of queries of one image.

        Args:
            pred_instances (InstanceData): ``scores`` (K * N, C) and
                ``bboxes`` (K * N, 4); group k is rows ``[k*N, (k+1)*N)``.
            gt_instances (InstanceData): ``labels`` (G, ), ``bboxes`` (G, 4).
            img_meta (dict, optional): with ``img_shape``.
            num_groups (int): K.

        Returns:
            AssignResult: ``gt_inds`` and ``labels`` of all K * N queries;
            within each group every gt is matched at most once.
        """
        num_preds = len(pred_instances)
        if num_groups < 1 or num_preds % num_groups:
            raise ValueError(
                f'GroupOneToOneAssigner: {num_preds} queries do not split '
                f'into {num_groups} equal groups')
        if num_groups == 1:
            return super().assign(pred_instances, gt_instances, img_meta)
        cost = None
        if num_preds > 0 and len(gt_instances) > 0:
            cost = self._total_cost(pred_instances, gt_instances, img_meta)
            cost = cost.detach().cpu().numpy()
        size = num_preds // num_groups
        results = [
            self._solve(
                None if cost is None else cost[k * size:(k + 1) * size], size,
                gt_instances.labels) for k in range(num_groups)
        ]
        return AssignResult(
            len(gt_instances),
            torch.cat([r.gt_inds for r in results]),
            None,
            labels=torch.cat([r.labels for r in results]))
