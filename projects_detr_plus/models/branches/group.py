"""Group DETR as a query branch: K - 1 more groups of main queries.

Group DETR (Chen et al., 2022) trains K groups of queries with shared
decoder weights: self-attention only inside a group, Hungarian matching
one-to-one inside each group against the same ground truth, losses summed
over groups.  At inference only the first group (our main queries) runs, so
the model is a plain DINO and costs the same.

Queries of a two-stage DINO are an anchor (the encoder's top-k proposal) and
a learnable content vector (mixed query selection).  Each extra group here
reuses the main group's anchors (the encoder has one top-k; the paper's
groups are copies of the query set, with their own parameters only where the
queries have parameters) and has its own content embedding.  The groups are
folded into the batch dimension for self-attention (``num_groups`` of
:class:`BranchQueries`), which costs (K - 1) * N**2, not (K * N)**2.

Loss: one :class:`~...task_modules.GroupOneToOneAssigner` call per image
matches all groups (one cost matrix, one Hungarian solve per group); the
losses are normalised by the positives of all groups (K - 1 times the number
of ground truths), i.e. the mean over the extra groups, times
``loss_weight``.  The official code averages over all K groups, the first
included; ``loss_weight = K - 1`` weighs every group like the main one.
"""
import torch
from mmdet.registry import MODELS
from torch import nn

from ..task_modules.group_assigner import (GroupOneToOneAssigner,
                                           with_query_groups)
from .base import BranchQueries, matched_set_loss


@MODELS.register_module()
class GroupQueryBranch(nn.Module):
    """K - 1 extra query groups matched one-to-one per group.

    Args:
        num_groups (int): K, the number of groups *including* the main one
            (11 in the paper).  1 adds nothing.
        loss_weight (float): weight of the extra groups' mean loss.
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector; ``num_matching_queries`` is the group size N.
    """
    name = 'group'

    def __init__(self, num_classes, embed_dims, num_matching_queries,
                 num_groups=11, loss_weight=1.0):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f'num_groups must be >= 1, got {num_groups}')
        self.num_extra_groups = num_groups - 1
        self.group_size = num_matching_queries
        self.loss_weight = loss_weight
        self.content = nn.Embedding(self.num_extra_groups * self.group_size,
                                    embed_dims)

    def make_queries(self, main, batch_data_samples, **encoder_outputs):
        """(bs, (K-1) * N, dim) content and the main anchors repeated."""
        bs = main.query.shape[0]
        query = self.content.weight[None].expand(bs, -1, -1)
        reference = main.reference.repeat(1, self.num_extra_groups, 1)
        return BranchQueries(self.name, query, reference,
                             num_groups=max(self.num_extra_groups, 1))

    def loss(self, head, cls_scores, bbox_preds, queries, batch_data_samples):
        """One-to-one loss per group, averaged over the extra groups.

        Args:
            cls_scores (Tensor): (num_layers, bs, (K-1) * N, num_classes).
            bbox_preds (Tensor): (num_layers, bs, (K-1) * N, 4).
        """
        if self.num_extra_groups == 0:
            return {}
        if not isinstance(head.assigner, GroupOneToOneAssigner):
            raise TypeError(
                'GroupQueryBranch needs the head to match with '
                "train_cfg.assigner.type='GroupOneToOneAssigner', got "
                f'{type(head.assigner).__name__}')
        metas = with_query_groups([s.metainfo for s in batch_data_samples],
                                  self.num_extra_groups)
        return matched_set_loss(
            head, f'{self.name}_', cls_scores, bbox_preds,
            [s.gt_instances for s in batch_data_samples], metas,
            self.loss_weight)

    def extra_repr(self):
        return (f'num_groups={self.num_extra_groups + 1}, '
                f'group_size={self.group_size}')
