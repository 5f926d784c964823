"""Query branches: extra decoder query sets with their own targets and loss.

Every training-time trick of the DETR family (DINO's denoising, Group DETR,
H-DETR, Co-DETR's customized positive queries, DDQ's dense queries) is a set of
decoder queries kept apart from the main, one-to-one queries by the decoder's
self-attention mask.  A detector builds the main queries, asks each training
branch for its :class:`BranchQueries`, runs the decoder *once* over their
concatenation (:func:`concat_branches`: queries that may see each other share
an attention block, equal groups are folded into the batch), splits the
outputs (:func:`split_branches`) and lets every branch compute its own loss.
At inference only the main queries exist, so no branch adds inference cost.

A branch is a module with a ``name`` (unique in a detector) and two methods::

    make_queries(main, batch_data_samples, **encoder_outputs) -> BranchQueries
    loss(head, cls_scores, bbox_preds, queries, batch_data_samples) -> dict

``encoder_outputs`` are ``memory`` (bs, num_keys, dim), ``memory_mask``,
``spatial_shapes``, ``enc_class`` (bs, num_keys, C) and ``enc_coord_unact``
(bs, num_keys, 4): the encoder tokens and their two-stage proposals;
``enc_score`` (bs, num_keys): what the detector ranks proposals by (DINO:
best class logit; Deformable DETR: class 0's); ``enc_memory``
(bs, num_keys, dim) and ``enc_anchors`` (bs, num_keys, 4): the transformed
tokens and anchors the proposals were predicted from; ``head``: the
detection head; the detector's ``select_proposals(enc_class,
enc_coord_unact)`` and ``encoder_loss(enc_cls, enc_coord, gts, metas)``
(for a branch with proposals of its own); plus whatever the detector adds
(DDQ: ``token_content``).
``cls_scores`` (num_layers, bs, n, num_classes) and ``bbox_preds``
(num_layers, bs, n, 4) are the predictions on that branch's queries only:
of the head's per-layer branches, or of the branch's own
(``BranchQueries.predictors``).
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from mmdet.models.layers.transformer.utils import inverse_sigmoid
from mmdet.models.losses import QualityFocalLoss
from mmdet.models.utils import multi_apply
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_overlaps
from mmdet.utils import reduce_mean
from torch import Tensor

MAIN = 'main'


@dataclass
class BranchQueries:
    """The decoder queries of one branch.

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
            mask[group, group] = (False if self.attn_mask is None else
                                  self.attn_mask)
        return mask


@dataclass(frozen=True)
class AttentionBlock:
    """Queries ``[start, start + num_groups * group_size)`` of the decoder
    input, split into ``num_groups`` groups that attend only inside
    themselves, under ``mask`` ((group_size, group_size), True = blocked,
    or None) and ``padding`` ((bs, num_groups * group_size), True = no query
    attends to that one, or None)."""
    start: int
    num_groups: int
    group_size: int
    mask: Optional[Tensor] = None
    padding: Optional[Tensor] = None

    @property
    def end(self) -> int:
        return self.start + self.num_groups * self.group_size


def concat_branches(parts: List[BranchQueries], dense_mask: bool = False):
    """Concatenate branch queries and lay out the decoder self-attention.

    The main branch comes first, then the branches that see it, then the
    others.  Queries that can attend to each other form one attention block:
    the main queries with every branch that sees them (under a block mask),
    and each other branch on its own with its groups folded into the batch
    dimension (cost ``num_groups * group_size**2`` instead of the
    ``(sum of all sizes)**2`` of a single masked attention).

    Args:
        parts (list[BranchQueries]): main first, in the order above.
        dense_mask (bool): lay out everything as one masked attention over
            all queries instead (what the reference implementations do; for
            checks and benchmarks).

    Returns:
        tuple: query (bs, N, dim), reference (bs, N, 4) and the layout: None
        (one block without a mask: plain self-attention) or a list of
        :class:`AttentionBlock` covering ``[0, N)`` in order (one block with
        a (N, N) mask for ``dense_mask``).  N is the sum of the parts'
        sizes.
    """
    _check_order(parts)
    query = torch.cat([p.query for p in parts], dim=1)
    reference = torch.cat([p.reference for p in parts], dim=1)
    if dense_mask:
        padding = None
        if any(p.padding is not None for p in parts):
            padding = torch.cat([
                p.query.new_zeros(p.query.shape[:2], dtype=torch.bool)
                if p.padding is None else _padding(p) for p in parts], dim=1)
        return query, reference, [AttentionBlock(0, 1, query.shape[1],
                                                 _dense_mask(parts), padding)]
    seeing = [p for p in parts if p.name == MAIN or p.sees_main]
    if len(seeing) == 1 and parts[0].num_groups == 1:
        main_block = AttentionBlock(0, 1, parts[0].num_queries,
                                    parts[0].attn_mask)
    else:
        size = sum(p.num_queries for p in seeing)
        main_block = AttentionBlock(0, 1, size, _dense_mask(seeing))
    blocks, start = [main_block], main_block.end
    for part in parts[len(seeing):]:
        if part.num_queries:
            blocks.append(AttentionBlock(start, part.num_groups,
                                         part.group_size, part.attn_mask,
                                         _padding(part)))
        start += part.num_queries
    if len(blocks) == 1 and main_block.mask is None:
        return query, reference, None
    return query, reference, blocks


def _check_order(parts: List[BranchQueries]):
    assert parts and parts[0].name == MAIN, 'the main branch comes first'
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f'query branch names must be unique, got {names}')
    seeing = [p.sees_main for p in parts[1:]]
    if seeing != sorted(seeing, reverse=True):
        raise ValueError('branches that see the main queries must come '
                         f'before the others, got {names}')


def _padding(part: BranchQueries) -> Optional[Tensor]:
    """The part's (bs, n) key padding (None when it has none).

    The first query of each group stays visible even when it is padding
    (an image without any real query there), so that no attention row is
    empty (softmax over nothing gives NaN); only padding queries see it.
    """
    if part.padding is None:
        return None
    bs = part.padding.shape[0]
    padding = part.padding.reshape(bs, part.num_groups, -1).clone()
    padding[:, :, 0] = False
    return padding.reshape(bs, -1)


def _dense_mask(parts: List[BranchQueries]) -> Tensor:
    """One (N, N) mask, True = blocked, for all parts (main first)."""
    total = sum(p.num_queries for p in parts)
    mask = torch.ones(total, total, dtype=torch.bool,
                      device=parts[0].query.device)
    start, num_main = 0, parts[0].num_queries
    for part in parts:
        end = start + part.num_queries
        mask[start:end, start:end] = part.inner_mask()
        if part.sees_main and part.name != MAIN:
            mask[start:end, :num_main] = False
        start = end
    return mask


def block_self_attention(self_attn, query: Tensor, query_pos: Tensor,
                         layout, **kwargs) -> Tensor:
    """Decoder self-attention under a layout from :func:`concat_branches`.

    Args:
        self_attn (MultiheadAttention): mmcv's (batch first, residual
            included).
        query, query_pos (Tensor): (bs, N, dim).
        layout: None, a (N, N) bool mask or a list of
            :class:`AttentionBlock`.

    Returns:
        Tensor: (bs, N, dim).
    """
    if layout is None or isinstance(layout, Tensor):
        return self_attn(query=query, key=query, value=query,
                         query_pos=query_pos, key_pos=query_pos,
                         attn_mask=layout, **kwargs)
    outputs = []
    for block in layout:
        q = _fold(query[:, block.start:block.end], block.num_groups)
        pos = _fold(query_pos[:, block.start:block.end], block.num_groups)
        padding = None
        if block.padding is not None:
            padding = block.padding.reshape(q.shape[:2])
        out = self_attn(query=q, key=q, value=q, query_pos=pos, key_pos=pos,
                        attn_mask=_per_head(block.mask, self_attn.num_heads),
                        key_padding_mask=padding, **kwargs)
        outputs.append(out.reshape(query.shape[0], -1, query.shape[-1]))
    return torch.cat(outputs, dim=1)


def _per_head(mask: Optional[Tensor], num_heads: int) -> Optional[Tensor]:
    """A per-image (bs, L, S) mask as torch's attention wants it:
    (bs * num_heads, L, S), image-major."""
    if mask is None or mask.dim() == 2:
        return mask
    return mask.repeat_interleave(num_heads, dim=0)


def _fold(x: Tensor, num_groups: int) -> Tensor:
    """(bs, G * S, dim) -> (bs * G, S, dim), group g of image b at b*G+g."""
    bs, n, dim = x.shape
    return x.reshape(bs * num_groups, n // num_groups, dim)


def split_branches(tensor: Tensor, parts: List[BranchQueries], dim: int):
    """Split ``tensor`` along its query dimension ``dim`` back into parts."""
    return torch.split(tensor, [p.num_queries for p in parts], dim=dim)


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
            return torch.cat([layers[layer_id](chunk) for (_, layers), chunk
                              in zip(self.segments, chunks)], dim=1)
        return apply


def branch_layers(parts: List[BranchQueries], default, index: int):
    """The per-layer predictors of every part: ``part.predictors[index]``
    (0: classes, 1: box refinement) or ``default`` (the head's)."""
    return SegmentedLayers([
        (p.num_queries, default if p.predictors is None else
         p.predictors[index]) for p in parts])


def branch_predictions(head, hidden_states: Tensor, references,
                       parts: List[BranchQueries]):
    """Class logits and boxes of all queries, each branch by its predictors.

    Args:
        head (DeformableDETRHead): its ``cls_branches``/``reg_branches``
            predict for the branches without their own.
        hidden_states (Tensor): (num_layers, bs, N, dim).
        references (list[Tensor]): num_layers (+ 1) of (bs, N, 4) in [0, 1].
        parts (list[BranchQueries]): the branches, in decoder order.

    Returns:
        tuple[Tensor, Tensor]: (num_layers, bs, N, num_classes) logits and
        (num_layers, bs, N, 4) boxes (normalised cx, cy, w, h), as the
        head's ``forward``.
    """
    if all(p.predictors is None for p in parts):
        return head(hidden_states, references)
    cls_layers = branch_layers(parts, head.cls_branches, 0)
    reg_layers = branch_layers(parts, head.reg_branches, 1)
    eps = getattr(head, 'reference_eps', 1e-5)  # DINOHeadPlus's
    scores, boxes = [], []
    for layer_id, state in enumerate(hidden_states):
        scores.append(cls_layers[layer_id](state))
        delta = reg_layers[layer_id](state)
        boxes.append((delta + inverse_sigmoid(references[layer_id],
                                              eps=eps)).sigmoid())
    return torch.stack(scores), torch.stack(boxes)


def layer_loss_dict(prefix: str, losses_per_layer: dict) -> dict:
    """Name per-decoder-layer losses as mmdet does.

    ``{'loss_cls': [l0, l1, l2]}`` with prefix ``'dn_'`` becomes
    ``{'dn_loss_cls': l2, 'd0.dn_loss_cls': l0, 'd1.dn_loss_cls': l1}``.
    """
    named = {}
    for key, per_layer in losses_per_layer.items():
        named[f'{prefix}{key}'] = per_layer[-1]
        for layer_id, value in enumerate(per_layer[:-1]):
            named[f'd{layer_id}.{prefix}{key}'] = value
    return named


def matched_set_loss(head, prefix: str, cls_scores: Tensor,
                     bbox_preds: Tensor, batch_gt_instances, batch_img_metas,
                     loss_weight: float = 1.0) -> dict:
    """The head's matched (DETR) loss of every decoder layer, named.

    Each layer goes through ``head.loss_by_feat_single``: the head's
    assigner matches queries to ``batch_gt_instances``, losses are
    normalised by the number of positives.

    Args:
        head (DETRHead): the detector's head.
        prefix (str): loss-key prefix, e.g. ``'group_'``.
        cls_scores (Tensor): (num_layers, bs, n, num_classes).
        bbox_preds (Tensor): (num_layers, bs, n, 4), normalised cxcywh.
        batch_gt_instances (list[InstanceData]): targets per image.
        batch_img_metas (list[dict]): per image.
        loss_weight (float): multiplies every loss.
    """
    losses_cls, losses_bbox, losses_iou = multi_apply(
        head.loss_by_feat_single, cls_scores, bbox_preds,
        batch_gt_instances=batch_gt_instances,
        batch_img_metas=batch_img_metas)
    per_layer = dict(loss_cls=losses_cls, loss_bbox=losses_bbox,
                     loss_iou=losses_iou)
    if loss_weight != 1.0:
        per_layer = {key: [loss * loss_weight for loss in losses]
                     for key, losses in per_layer.items()}
    return layer_loss_dict(prefix, per_layer)


def fixed_target_loss(head, prefix: str, cls_scores: Tensor,
                      bbox_preds: Tensor, labels: Tensor, bbox_targets: Tensor,
                      weights: Tensor, batch_img_metas,
                      loss_weight: float = 1.0,
                      bbox_weights: Optional[Tensor] = None) -> dict:
    """The head's DETR losses of every decoder layer for queries whose
    targets are fixed in advance (no matching), named.

    Args:
        head (DETRHead): gives ``loss_cls``, ``loss_bbox``, ``loss_iou``
            and ``sync_cls_avg_factor``.
        prefix (str): loss-key prefix.
        cls_scores (Tensor): (num_layers, bs, n, num_classes).
        bbox_preds (Tensor): (num_layers, bs, n, 4), normalised cxcywh.
        labels (Tensor): (bs, n) class of each query's target
            (``num_classes``: background).
        bbox_targets (Tensor): (bs, n, 4) normalised cxcywh.
        weights (Tensor): (bs, n) classification weight, 0 for padding.
        batch_img_metas (list[dict]): per image, with ``img_shape``.
        loss_weight (float): multiplies every loss.
        bbox_weights (Tensor, optional): (bs, n), 1 for the positives that
            have a box loss; default ``weights`` (every query a positive).

    As ``DETRHead.loss_by_feat_single``: every loss is normalised by the
    number of positives (box losses: averaged over ranks; classification:
    too with ``head.sync_cls_avg_factor``); with ``QualityFocalLoss`` the
    classification target of a positive is its predicted box's IoU.
    """
    num_classes = cls_scores.shape[-1]
    if bbox_weights is None:
        bbox_weights = weights
    labels = torch.where(weights > 0, labels,
                         labels.new_full((), num_classes))
    num_pos = bbox_weights.sum()
    cls_avg = reduce_mean(num_pos) if head.sync_cls_avg_factor else num_pos
    cls_avg = max(cls_avg.item(), 1.0)
    box_avg = torch.clamp(reduce_mean(num_pos), min=1).item()
    factors = torch.stack([
        bbox_preds.new_tensor([w, h, w, h])
        for h, w in (meta['img_shape'][:2] for meta in batch_img_metas)
    ])[:, None]  # (bs, 1, 4)
    target_xyxy = (bbox_cxcywh_to_xyxy(bbox_targets) * factors).reshape(-1, 4)
    flat_weights = weights.reshape(-1)
    flat_box_weights = bbox_weights.reshape(-1)
    per_layer = dict(loss_cls=[], loss_bbox=[], loss_iou=[])
    for layer_cls, layer_bbox in zip(cls_scores, bbox_preds):
        pred_xyxy = (bbox_cxcywh_to_xyxy(layer_bbox) * factors).reshape(-1, 4)
        cls_target = labels.reshape(-1)
        if isinstance(head.loss_cls, QualityFocalLoss):  # as mmdet's heads
            quality = bbox_overlaps(pred_xyxy.detach(), target_xyxy,
                                    is_aligned=True) * flat_box_weights
            cls_target = (cls_target, quality)
        per_layer['loss_cls'].append(head.loss_cls(
            layer_cls.reshape(-1, num_classes), cls_target, flat_weights,
            avg_factor=cls_avg) * loss_weight)
        per_layer['loss_iou'].append(head.loss_iou(
            pred_xyxy, target_xyxy, flat_box_weights, avg_factor=box_avg)
            * loss_weight)
        per_layer['loss_bbox'].append(head.loss_bbox(
            layer_bbox.reshape(-1, 4), bbox_targets.reshape(-1, 4),
            flat_box_weights[:, None].expand(-1, 4), avg_factor=box_avg)
            * loss_weight)
    return layer_loss_dict(prefix, per_layer)


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
    coords = torch.gather(enc_coord_unact, 1,
                          ranked[..., None].expand(-1, -1, 4))
    return scores, coords


def learnable_content(table, batch_size):
    """(bs, n, dim) content queries from an (n, dim) embedding table."""
    return table.weight[None].expand(batch_size, -1, -1)
