"""Query branches: extra decoder query sets with their own targets and loss.

Every training-time trick of the DETR family (DINO's denoising, Group DETR,
H-DETR, Co-DETR's customized positive queries, DDQ's dense queries) is a set of
decoder queries kept apart from the main, one-to-one queries by the decoder's
self-attention mask.  A detector builds the main queries, asks each training
branch for its :class:`BranchQueries`, runs the decoder *once* over their
concatenation (:func:`concat_branches`), splits the outputs
(:func:`split_branches`) and lets every branch compute its own loss.  At
inference only the main queries exist, so no branch adds inference cost.

A branch is a module with two methods::

    make_queries(main, batch_data_samples, **encoder_outputs) -> BranchQueries
    loss(head, cls_scores, bbox_preds, queries, batch_data_samples) -> dict

``cls_scores`` (num_layers, bs, n, num_classes) and ``bbox_preds``
(num_layers, bs, n, 4) are the head's outputs on that branch's queries only.
"""
from dataclasses import dataclass, field
from typing import List, Optional

import torch
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
        attn_mask (Tensor | None): self-attention mask *inside* the branch,
            (n, n) bool, True where attention is blocked.  None: all visible.
        sees_main (bool): whether this branch's queries may attend to the main
            queries (DINO's denoising queries do).  The main queries never
            attend to any other branch.
        meta (dict): whatever the branch's loss needs (targets, group sizes).
    """
    name: str
    query: Tensor
    reference: Tensor
    attn_mask: Optional[Tensor] = None
    sees_main: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def num_queries(self) -> int:
        return self.query.shape[1]


def concat_branches(parts: List[BranchQueries]):
    """Concatenate branch queries and build the block self-attention mask.

    The first part must be the main branch.

    Returns:
        tuple: query (bs, N, dim), reference (bs, N, 4) and attn_mask
        (N, N) bool (True = blocked), or None when there is only one part
        without an inner mask.  N is the sum of the parts' sizes.
    """
    assert parts and parts[0].name == MAIN, 'the main branch comes first'
    query = torch.cat([p.query for p in parts], dim=1)
    reference = torch.cat([p.reference for p in parts], dim=1)
    if len(parts) == 1:
        return query, reference, parts[0].attn_mask
    total = query.shape[1]
    mask = torch.ones(total, total, dtype=torch.bool, device=query.device)
    start, num_main = 0, parts[0].num_queries
    for part in parts:
        end = start + part.num_queries
        inner = part.attn_mask
        mask[start:end, start:end] = False if inner is None else inner
        if part.sees_main and part.name != MAIN:
            mask[start:end, :num_main] = False
        start = end
    return query, reference, mask


def split_branches(tensor: Tensor, parts: List[BranchQueries], dim: int):
    """Split ``tensor`` along its query dimension ``dim`` back into parts."""
    return torch.split(tensor, [p.num_queries for p in parts], dim=dim)


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
