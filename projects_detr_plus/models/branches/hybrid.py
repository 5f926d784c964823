"""H-DETR's hybrid matching as a query branch.

H-DETR (Jia et al., 2023) adds a second query set trained one-to-many: the
ground truth is repeated ``k`` times and matched to the set with the
Hungarian algorithm, so each object gets ``k`` positive queries, which
speeds up training.  The set never attends to the main queries nor they to
it, and it is dropped at inference (the official values: 1500 queries,
k = 6, loss weight 1).

Anchors: the encoder proposals ranked right after the main queries' top N
(ranks N .. N + M by the detector's ranking score), detached, as the
official code takes its 300 + 1500 queries from one top-1800
(``HDETR/H-Deformable-DETR``, ``models/deformable_detr.py``); content: the
branch's own learnable table (mixed query selection), initialised like the
main content table (the official code has one table for both sets).
Self-attention runs inside the set only (its own attention block: M**2, not
(N + M)**2).  Its loss covers the decoder layers, not the encoder proposals,
as the official ``engine.py``.

Two compositions are shipped.  H-Deformable-DETR (two-stage Deformable DETR
with mixed selection and look forward twice, no denoising) is the official
model.  H-DINO has no official counterpart; its choices: DINO's 900 main
queries and its denoising kept unchanged (it is DINO plus this branch, so
any gain is the branch's), 1500 hybrid queries from the proposals ranked
900 .. 2400 with k = 6 and weight 1 (H-DETR's values), content initialised
like DINO's (xavier).  H-DETR's maintainers report that one-to-many
matching conflicts with denoising (H-Deformable-DETR#16: a DINO port fell
from 48.7 to 46.5 AP); ``dn_cfg=None`` removes the denoising.
"""
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from torch import nn

from ..losses.set_losses import matched_set_loss
from .protocol import QueryBranch
from .queries import QuerySet, learnable_content, top_proposals


@MODELS.register_module()
class HybridMatchingBranch(QueryBranch):
    """One-to-many queries matched against the ground truth repeated k times.

    Args:
        num_queries (int): M, the size of the set (1500 in H-DETR).
        k_one_to_many (int): copies of each ground truth (6 in H-DETR).
        loss_weight (float): the branch's loss weight (lambda, 1.0).
        normalise_by (str): what divides the losses: ``'targets'``, the
            number of repeated ground truths (k x objects; the official
            ``SetCriterion``'s ``num_boxes``), or ``'matches'``, the number
            of matched queries (mmdet's convention).  They differ when an
            image has more than M / k objects.
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector; ``num_matching_queries`` is the main set's N.
    """
    name = 'hybrid'

    def __init__(self,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 num_queries=1500,
                 k_one_to_many=6,
                 loss_weight=1.0,
                 normalise_by='targets'):
        super().__init__()
        if num_queries < 1 or k_one_to_many < 1:
            raise ValueError('num_queries and k_one_to_many must be >= 1, '
                             f'got {num_queries} and {k_one_to_many}')
        if normalise_by not in ('targets', 'matches'):
            raise ValueError("normalise_by must be 'targets' or 'matches', "
                             f'got {normalise_by!r}')
        self.normalise_by = normalise_by
        self.num_queries = num_queries
        self.num_main_queries = num_matching_queries
        self.k_one_to_many = k_one_to_many
        self.loss_weight = loss_weight
        self.content = nn.Embedding(num_queries, embed_dims)

    def content_tables(self):
        """The content table, initialised by the detector like its main
        content (H-Deformable-DETR: one N(0, 1) table for both sets)."""
        return [self.content.weight]

    def make_queries(self, main, context, detector, batch_data_samples):
        """Queries on the encoder proposals ranked N .. N + M (by
        ``context.enc_score``, what the main queries are ranked by)."""
        num_keys = context.enc_class.shape[1]
        if self.num_main_queries + self.num_queries > num_keys:
            raise ValueError(
                f'HybridMatchingBranch: {self.num_main_queries} main + '
                f'{self.num_queries} hybrid queries need that many encoder '
                f'proposals, but the encoder has only {num_keys} tokens; '
                'lower num_queries')
        _, reference = top_proposals(
            context.enc_score,
            context.enc_class,
            context.enc_coord_unact,
            self.num_queries,
            start=self.num_main_queries)
        query = learnable_content(self.content, context.batch_size)
        return QuerySet(self.name, query, reference.detach())

    def loss(self, detector, predictions, queries, batch_data_samples):
        """Hungarian loss against each image's ground truth repeated k
        times, every decoder layer ((num_layers, bs, M, ...) predictions).
        """
        repeated = [
            InstanceData.cat([s.gt_instances] * self.k_one_to_many)
            for s in batch_data_samples
        ]
        normaliser = None
        if self.normalise_by == 'targets':
            normaliser = sum(len(gt) for gt in repeated)
        return matched_set_loss(
            detector.bbox_head,
            f'{self.name}_',
            predictions.cls_scores,
            predictions.bbox_preds,
            repeated, [s.metainfo for s in batch_data_samples],
            self.loss_weight,
            normaliser=normaliser)
