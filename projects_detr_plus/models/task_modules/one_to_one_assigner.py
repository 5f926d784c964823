"""One-to-one (Hungarian) assigner with a batched cost computation.

``OneToOneAssigner.assign`` is a drop-in replacement of mmdet's
``HungarianAssigner.assign`` (same costs, same :obj:`AssignResult`).
``OneToOneAssigner.assign_batch`` computes the cost matrices of a whole batch
with one call per cost type on the model's device, copies them to the host
once and solves each image with ``scipy.optimize.linear_sum_assignment``.

Shapes: ``Q_i`` = queries of image ``i``, ``G_i`` = its ground truths,
``Q = sum(Q_i)``, ``G = sum(G_i)``, ``C`` = number of classes.
"""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from mmdet.models.task_modules.assigners import AssignResult, BaseAssigner
from mmdet.models.task_modules.assigners.match_cost import BBoxL1Cost
from mmdet.registry import TASK_UTILS
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Costs that read ``img_meta['img_shape']`` to normalise boxes.  In a batch
# they get boxes pre-divided by their own image's size and a unit img_shape;
# every other cost must be a pairwise (query, gt) function of the instances.
IMAGE_SIZE_COSTS = (BBoxL1Cost, )
_UNIT_META = dict(img_shape=(1, 1))


@TASK_UTILS.register_module()
class OneToOneAssigner(BaseAssigner):
    """Hungarian one-to-one matching of queries to ground truths.

    Each query gets ``gt_inds`` 0 (negative) or the 1-based index of its
    matched gt, and ``labels`` -1 or that gt's label, exactly as mmdet's
    ``HungarianAssigner``.  When ``G_i > Q_i`` only ``Q_i`` gts are matched.

    Args:
        match_costs (dict | list[dict]): Match cost configs built with
            ``TASK_UTILS``, e.g. ``[dict(type='FocalLossCost', weight=2.0),
            dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
            dict(type='IoUCost', iou_mode='giou', weight=2.0)]``.
    """

    def __init__(self, match_costs: Union[dict, ConfigDict, List[dict]]):
        if isinstance(match_costs, dict):
            match_costs = [match_costs]
        assert len(match_costs) > 0, 'match_costs must not be empty.'
        self.match_costs = [TASK_UTILS.build(cfg) for cfg in match_costs]

    def assign(self,
               pred_instances: InstanceData,
               gt_instances: InstanceData,
               img_meta: Optional[dict] = None,
               **kwargs) -> AssignResult:
        """Assign the queries of one image.

        Args:
            pred_instances (InstanceData): ``scores`` (Q_i, C) logits and
                ``bboxes`` (Q_i, 4) absolute xyxy (or whatever the costs read).
            gt_instances (InstanceData): ``labels`` (G_i, ) and ``bboxes``
                (G_i, 4) absolute xyxy.
            img_meta (dict, optional): Holds ``img_shape`` (h, w).

        Returns:
            AssignResult: ``gt_inds`` (Q_i, ) and ``labels`` (Q_i, ).
        """
        cost = None
        if len(pred_instances) > 0 and len(gt_instances) > 0:
            cost = self._total_cost(pred_instances, gt_instances, img_meta)
            cost = cost.detach().cpu().numpy()
        return self._solve(cost, len(pred_instances), gt_instances.labels)

    def assign_batch(self, batch_pred_instances: Sequence[InstanceData],
                     batch_gt_instances: Sequence[InstanceData],
                     batch_img_metas: Sequence[dict]) -> List[AssignResult]:
        """Assign the queries of every image of a batch.

        Costs are computed once for all images: all queries (Q, ...) against
        all gts (G, ...), giving a (Q, G) matrix per cost type whose diagonal
        (Q_i, G_i) blocks are the per-image costs.  Those blocks are copied
        to the host in a single transfer and solved one image at a time.

        Args:
            batch_pred_instances (list[InstanceData]): Per image, as in
                :meth:`assign`; all must have the same fields.
            batch_gt_instances (list[InstanceData]): Per image, as in
                :meth:`assign`; all must have the same fields.
            batch_img_metas (list[dict]): Per image, with ``img_shape``.

        Returns:
            list[AssignResult]: One per image, equal to :meth:`assign`.
        """
        num_preds = [len(p) for p in batch_pred_instances]
        num_gts = [len(g) for g in batch_gt_instances]
        costs = [None] * len(num_preds)
        if sum(num_preds) > 0 and sum(num_gts) > 0:
            cost = self._batch_cost(batch_pred_instances, batch_gt_instances,
                                    batch_img_metas)
            costs = _diagonal_blocks(cost, num_preds, num_gts)
        return [
            self._solve(c, n, g.labels, img_idx=i)
            for i, (c, n,
                    g) in enumerate(zip(costs, num_preds, batch_gt_instances))
        ]

    def _total_cost(self, preds: InstanceData, gts: InstanceData,
                    img_meta: Optional[dict]) -> Tensor:
        """Weighted sum of all costs for one image, shape (Q_i, G_i)."""
        costs = [
            c(pred_instances=preds, gt_instances=gts, img_meta=img_meta)
            for c in self.match_costs
        ]
        return torch.stack(costs).sum(dim=0)

    def _batch_cost(self, batch_preds: Sequence[InstanceData],
                    batch_gts: Sequence[InstanceData],
                    img_metas: Sequence[dict]) -> Tensor:
        """Weighted sum of all costs for all query/gt pairs, shape (Q, G).

        Costs in ``IMAGE_SIZE_COSTS`` see boxes divided by their own image's
        (w, h, w, h) and ``img_shape=(1, 1)``; the others see the
        concatenated instances unchanged.
        """
        preds, gts = InstanceData.cat(batch_preds), InstanceData.cat(batch_gts)
        unit_preds = InstanceData(bboxes=_unit_boxes(batch_preds, img_metas))
        unit_gts = InstanceData(bboxes=_unit_boxes(batch_gts, img_metas))
        costs = []
        for match_cost in self.match_costs:
            if isinstance(match_cost, IMAGE_SIZE_COSTS):
                costs.append(match_cost(unit_preds, unit_gts, _UNIT_META))
            else:
                costs.append(match_cost(preds, gts, None))
        return torch.stack(costs).sum(dim=0)

    @staticmethod
    def _solve(cost: Optional[np.ndarray],
               num_preds: int,
               gt_labels: Tensor,
               img_idx: int = 0) -> AssignResult:
        """Hungarian matching of one image's (Q_i, G_i) cost on the CPU.

        ``cost`` is None when ``Q_i == 0`` or ``G_i == 0``: nothing is
        matched (every query is negative when there is no gt).
        """
        num_gts, device = len(gt_labels), gt_labels.device
        gt_inds = torch.zeros(num_preds, dtype=torch.long, device=device)
        labels = torch.full((num_preds, ), -1, dtype=torch.long, device=device)
        if cost is not None and num_preds > 0 and num_gts > 0:
            _check_finite(cost, img_idx)
            rows, cols = linear_sum_assignment(cost)
            rows = torch.from_numpy(rows).to(device)
            cols = torch.from_numpy(cols).to(device)
            gt_inds[rows] = cols + 1
            labels[rows] = gt_labels[cols].long()
        return AssignResult(num_gts, gt_inds, None, labels=labels)


def _unit_boxes(batch: Sequence[InstanceData],
                img_metas: Sequence[dict]) -> Tensor:
    """Concatenated ``bboxes`` (N, 4), each divided by its (w, h, w, h)."""
    boxes = []
    for instances, meta in zip(batch, img_metas):
        h, w = meta['img_shape'][:2]
        boxes.append(instances.bboxes /
                     instances.bboxes.new_tensor([w, h, w, h]))
    return torch.cat(boxes)


def _diagonal_blocks(cost: Tensor, num_preds: List[int],
                     num_gts: List[int]) -> List[Optional[np.ndarray]]:
    """Per-image (Q_i, G_i) blocks of a (Q, G) cost, one host copy.

    Returns None for images without queries or gts.
    """
    rows = np.cumsum([0] + num_preds)
    cols = np.cumsum([0] + num_gts)
    flat = torch.cat([
        cost[rows[i]:rows[i + 1], cols[i]:cols[i + 1]].reshape(-1)
        for i in range(len(num_preds))
    ]).detach().cpu().numpy()
    offsets = np.cumsum([0] + [q * g for q, g in zip(num_preds, num_gts)])
    return [
        flat[offsets[i]:offsets[i + 1]].reshape(q, g) if q * g else None
        for i, (q, g) in enumerate(zip(num_preds, num_gts))
    ]


def _check_finite(cost: np.ndarray, img_idx: int) -> None:
    """Raise ValueError if the (Q_i, G_i) cost has NaN or inf entries."""
    if np.isfinite(cost).all():
        return
    num_nan, num_inf = int(np.isnan(cost).sum()), int(np.isinf(cost).sum())
    q, g = np.argwhere(~np.isfinite(cost))[0]
    raise ValueError(
        f'OneToOneAssigner: the matching cost of image {img_idx} (shape '
        f'{cost.shape}) has {num_nan} NaN and {num_inf} inf entries, first '
        f'at query {q}, gt {g}; check the predicted scores/boxes and the '
        f'gt boxes of that image for NaN/inf.')
