"""The decoder self-attention layout: which queries may see which.

A layout is ``None`` (plain self-attention over all queries), a (N, N) bool
mask (True = blocked) or a list of :class:`AttentionBlock` covering the
queries in order: each block's queries attend only inside the block, its
groups are folded into the batch dimension (cost ``num_groups *
group_size**2`` instead of ``N**2``), and within a group a mask and a key
padding may block more.  The query branches build layouts
(:func:`~..branches.queries.concat_query_sets`); the decoder layers and
DDQ's distinct-query selection consume them.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


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


def block_self_attention(self_attn, query: Tensor, query_pos: Tensor, layout,
                         **kwargs) -> Tensor:
    """Decoder self-attention under a layout from :func:`concat_query_sets`.

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
        return self_attn(
            query=query,
            key=query,
            value=query,
            query_pos=query_pos,
            key_pos=query_pos,
            attn_mask=layout,
            **kwargs)
    outputs = []
    for block in layout:
        q = _fold(query[:, block.start:block.end], block.num_groups)
        pos = _fold(query_pos[:, block.start:block.end], block.num_groups)
        padding = None
        if block.padding is not None:
            padding = block.padding.reshape(q.shape[:2])
        out = self_attn(
            query=q,
            key=q,
            value=q,
            query_pos=pos,
            key_pos=pos,
            attn_mask=_per_head(block.mask, self_attn.num_heads),
            key_padding_mask=padding,
            **kwargs)
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
