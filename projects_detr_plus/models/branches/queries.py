"""Query sets: the decoder queries of the main set and of each branch.

A detector builds the main :class:`QuerySet`, asks each training branch
for its own (:mod:`.protocol`), runs the decoder *once* over their
concatenation (:func:`concat_query_sets`: queries that may see each other
share an attention block, equal groups are folded into the batch; the
layout itself is :mod:`..layers.attention_layout`'s), splits the outputs
(:func:`split_query_sets`) and lets every branch compute its own loss.  At
inference only the main queries exist, so no branch adds inference cost.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from mmdet.models.layers.transformer.utils import inverse_sigmoid
from torch import Tensor

from ..layers.attention_layout import AttentionBlock

MAIN = 'main'


@dataclass
class QuerySet:
    """The decoder queries of one branch (or the main ones).

    Attributes:
        name (str): branch name; also the prefix of its loss keys.
        query (Tensor): content queries, (bs, n, embed_dims).
        reference (Tensor): reference boxes before the sigmoid (inverse-sigmoid
            space), (bs, n, 4) as (cx, cy, w, h).
        attn_mask (Tensor | None): self-attention mask *inside* one group of
            the branch, (n / num_groups, n / num_groups) bool, True where
            attention is blocked.  None: all visible.
        sees_main (bool): whether this branch's queries may attend to the main
            queries (DINO's denoising queries do).  The main queries never
            attend to any other branch.
        num_groups (int): the queries are ``num_groups`` consecutive groups of
            equal size that only attend inside their own group (Group DETR).
        padding (Tensor | None): (bs, n) bool, True at padding queries
            (images with fewer queries than the batch's largest): no real
            query attends to them.  Only for branches that do not see the
            main queries.
        meta (dict): whatever the branch's loss needs (targets, group sizes).
        predictors (tuple | None): ``(cls_branches, reg_branches)``, one
            class and one box-refinement module per decoder layer that
            predict for this branch (DDQ's dense queries have their own);
            None: the detection head's.
        query_pos (Tensor | None): (bs, n, embed_dims) positional queries
            of their own, for detectors whose decoder takes ``query_pos``
            (Co-Deformable-DETR's customized queries); None: the
            detector's, derived from ``reference``.
    """
    name: str
    query: Tensor
    reference: Tensor
    attn_mask: Optional[Tensor] = None
    sees_main: bool = False
    num_groups: int = 1
    padding: Optional[Tensor] = None
    meta: dict = field(default_factory=dict)
    predictors: Optional[tuple] = None
    query_pos: Optional[Tensor] = None

    def __post_init__(self):
        if self.num_queries % self.num_groups:
            raise ValueError(
                f'branch {self.name!r}: {self.num_queries} queries do not '
                f'split into {self.num_groups} equal groups')
        if self.padding is not None and self.sees_main:
            raise ValueError(f'branch {self.name!r}: padding queries are only '
                             'supported in branches that do not see the main '
                             'queries')

    @property
    def num_queries(self) -> int:
        return self.query.shape[1]

    @property
    def group_size(self) -> int:
        return self.num_queries // self.num_groups

    def inner_mask(self) -> Tensor:
        """The branch's whole (n, n) self-attention mask, True = blocked."""
        n, size = self.num_queries, self.group_size
        mask = torch.ones(n, n, dtype=torch.bool, device=self.query.device)
        for start in range(0, n, max(size, 1)):
            group = slice(start, start + size)
            mask[group,
                 group] = (False if self.attn_mask is None else self.attn_mask)
        return mask


def concat_query_sets(query_sets: List[QuerySet], dense_mask: bool = False):
    """Concatenate branch queries and lay out the decoder self-attention.

    The main branch comes first, then the branches that see it, then the
    others.  Queries that can attend to each other form one attention block:
    the main queries with every branch that sees them (under a block mask),
    and each other branch on its own with its groups folded into the batch
    dimension (cost ``num_groups * group_size**2`` instead of the
    ``(sum of all sizes)**2`` of a single masked attention).

    Args:
        query_sets (list[QuerySet]): main first, in the order above.
        dense_mask (bool): lay out everything as one masked attention over
            all queries instead (what the reference implementations do; for
            checks and benchmarks).

    Returns:
        tuple: query (bs, N, dim), reference (bs, N, 4) and the layout: None
        (one block without a mask: plain self-attention) or a list of
        :class:`AttentionBlock` covering ``[0, N)`` in order (one block with
        a (N, N) mask for ``dense_mask``).  N is the sum of the sets'
        sizes.
    """
    _check_order(query_sets)
    query = torch.cat([p.query for p in query_sets], dim=1)
    reference = torch.cat([p.reference for p in query_sets], dim=1)
    if dense_mask:
        padding = None
        if any(p.padding is not None for p in query_sets):
            padding = torch.cat([
                p.query.new_zeros(p.query.shape[:2], dtype=torch.bool)
                if p.padding is None else _padding(p) for p in query_sets
            ],
                                dim=1)
        return query, reference, [
            AttentionBlock(0, 1, query.shape[1], _dense_mask(query_sets),
                           padding)
        ]
    seeing = [p for p in query_sets if p.name == MAIN or p.sees_main]
    if len(seeing) == 1 and query_sets[0].num_groups == 1:
        main_block = AttentionBlock(0, 1, query_sets[0].num_queries,
                                    query_sets[0].attn_mask)
    else:
        size = sum(p.num_queries for p in seeing)
        main_block = AttentionBlock(0, 1, size, _dense_mask(seeing))
    blocks, start = [main_block], main_block.end
    for qset in query_sets[len(seeing):]:
        if qset.num_queries:
            blocks.append(
                AttentionBlock(start, qset.num_groups, qset.group_size,
                               qset.attn_mask, _padding(qset)))
        start += qset.num_queries
    if len(blocks) == 1 and main_block.mask is None:
        return query, reference, None
    return query, reference, blocks


def _check_order(query_sets: List[QuerySet]):
    assert query_sets and query_sets[0].name == MAIN, \
        'the main queries come first'
    names = [p.name for p in query_sets]
    if len(set(names)) != len(names):
        raise ValueError(f'query branch names must be unique, got {names}')
    seeing = [p.sees_main for p in query_sets[1:]]
    if seeing != sorted(seeing, reverse=True):
        raise ValueError('branches that see the main queries must come '
                         f'before the others, got {names}')


def _padding(qset: QuerySet) -> Optional[Tensor]:
    """The set's (bs, n) key padding (None when it has none).

    The first query of each group stays visible even when it is padding
    (an image without any real query there), so that no attention row is
    empty (softmax over nothing gives NaN); only padding queries see it.
    """
    if qset.padding is None:
        return None
    bs = qset.padding.shape[0]
    padding = qset.padding.reshape(bs, qset.num_groups, -1).clone()
    padding[:, :, 0] = False
    return padding.reshape(bs, -1)


def _dense_mask(query_sets: List[QuerySet]) -> Tensor:
    """One (N, N) mask, True = blocked, for all query_sets (main first)."""
    total = sum(p.num_queries for p in query_sets)
    mask = torch.ones(
        total, total, dtype=torch.bool, device=query_sets[0].query.device)
    start, num_main = 0, query_sets[0].num_queries
    for qset in query_sets:
        end = start + qset.num_queries
        mask[start:end, start:end] = qset.inner_mask()
        if qset.sees_main and qset.name != MAIN:
            mask[start:end, :num_main] = False
        start = end
    return mask


def split_query_sets(tensor: Tensor, query_sets: List[QuerySet], dim: int):
    """Split ``tensor`` along its query dimension ``dim`` per query set."""
    return torch.split(tensor, [p.num_queries for p in query_sets], dim=dim)


class SegmentedLayers:
    """Per-decoder-layer modules applied segment by segment along the
    query dimension.

    ``SegmentedLayers([(n0, layers0), (n1, layers1)])[i](x)`` equals
    ``cat([layers0[i](x[:, :n0]), layers1[i](x[:, n0:n0 + n1])], dim=1)``;
    with a single segment it is ``layers0[i]`` itself.
    """

    def __init__(self, segments):
        self.segments = []
        for size, layers in [s for s in segments if s[0]] or segments[:1]:
            if self.segments and self.segments[-1][1] is layers:
                self.segments[-1] = (self.segments[-1][0] + size, layers)
            else:
                self.segments.append((size, layers))

    def __getitem__(self, layer_id):
        if len(self.segments) == 1:
            return self.segments[0][1][layer_id]

        def apply(x):
            chunks = x.split([size for size, _ in self.segments], dim=1)
            return torch.cat([
                layers[layer_id](chunk)
                for (_, layers), chunk in zip(self.segments, chunks)
            ],
                             dim=1)

        return apply


def query_set_layers(query_sets: List[QuerySet], default, which: str):
    """The per-layer predictors of every query set, ``which`` being
    ``'cls'`` (classes) or ``'reg'`` (box refinement): the set's own
    (``predictors``) or ``default`` (the head's)."""
    index = ('cls', 'reg').index(which)
    return SegmentedLayers([
        (q.num_queries,
         default if q.predictors is None else q.predictors[index])
        for q in query_sets
    ])


def set_predictions(head, hidden_states: Tensor, references,
                    query_sets: List[QuerySet]):
    """Class logits and boxes of all queries, each branch by its predictors.

    Args:
        head (DeformableDETRHead): its ``cls_branches``/``reg_branches``
            predict for the branches without their own.
        hidden_states (Tensor): (num_layers, bs, N, dim).
        references (list[Tensor]): num_layers (+ 1) of (bs, N, 4) in [0, 1].
        query_sets (list[QuerySet]): the branches, in decoder order.

    Returns:
        tuple[Tensor, Tensor]: (num_layers, bs, N, num_classes) logits and
        (num_layers, bs, N, 4) boxes (normalised cx, cy, w, h), as the
        head's ``forward``.
    """
    if all(p.predictors is None for p in query_sets):
        return head(hidden_states, references)
    cls_layers = query_set_layers(query_sets, head.cls_branches, 'cls')
    reg_layers = query_set_layers(query_sets, head.reg_branches, 'reg')
    eps = getattr(head, 'reference_eps', 1e-5)  # DINOHeadPlus's
    scores, boxes = [], []
    for layer_id, state in enumerate(hidden_states):
        scores.append(cls_layers[layer_id](state))
        delta = reg_layers[layer_id](state)
        boxes.append(
            (delta + inverse_sigmoid(references[layer_id], eps=eps)).sigmoid())
    return torch.stack(scores), torch.stack(boxes)


def top_proposals(enc_score, enc_class, enc_coord_unact, k, start=0):
    """The proposals ranked ``start .. start + k`` by ``enc_score``.

    Args:
        enc_score (Tensor): (bs, num_keys).
        enc_class (Tensor): (bs, num_keys, C).
        enc_coord_unact (Tensor): (bs, num_keys, 4) before the sigmoid.

    Returns:
        tuple[Tensor, Tensor]: their logits (bs, k, C) and boxes before the
        sigmoid (bs, k, 4), undetached.
    """
    num_keys = enc_score.shape[1]
    if start + k > num_keys:
        raise ValueError(
            f'{start + k} queries need that many encoder proposals, but the '
            f'encoder has only {num_keys} tokens; lower the number of '
            'queries')
    ranked = torch.topk(enc_score, k=start + k, dim=1)[1][:, start:]
    scores = torch.gather(
        enc_class, 1, ranked[..., None].expand(-1, -1, enc_class.shape[-1]))
    coords = torch.gather(enc_coord_unact, 1, ranked[...,
                                                     None].expand(-1, -1, 4))
    return scores, coords


def learnable_content(table, batch_size):
    """(bs, n, dim) content queries from an (n, dim) embedding table."""
    return table.weight[None].expand(batch_size, -1, -1)
