"""``MultiScaleDeformableAttentionPlus``: mmcv's MSDeformAttn module on the
DETR+ op.

A drop-in replacement for mmcv 2.x's ``MultiScaleDeformableAttention``: same
constructor arguments, forward signature, parameter names / state-dict keys
and initialisation (it subclasses it), registered into mmdet's ``MODELS`` as
``MultiScaleDeformableAttentionPlus``. The extra ``impl`` argument picks the
attention kernel:

* ``'ours'`` (default):
  :func:`projects_detr_plus.ops.multi_scale_deformable_attn` (compiled
  CPU / CUDA kernels when built, PyTorch otherwise);
* ``'pytorch'``: the pure-PyTorch ``grid_sample`` path of DETR+;
* ``'mmcv'``: what mmcv's module runs (its CUDA op on GPU, its PyTorch
  function elsewhere), for comparisons.
"""
from typing import Optional

import mmengine
import torch
from mmcv.ops.multi_scale_deform_attn import (MultiScaleDeformableAttention,
                                              MultiScaleDeformableAttnFunction)
from mmcv.ops.multi_scale_deform_attn import \
    multi_scale_deformable_attn_pytorch as mmcv_msda_pytorch
from mmdet.registry import MODELS
from mmengine.utils import deprecated_api_warning

from projects_detr_plus.ops import (multi_scale_deformable_attn,
                                    multi_scale_deformable_attn_pytorch)

IMPLS = ('ours', 'pytorch', 'mmcv')


@MODELS.register_module()
class MultiScaleDeformableAttentionPlus(MultiScaleDeformableAttention):
    """mmcv's ``MultiScaleDeformableAttention`` with a selectable op.

    Args: as mmcv's ``MultiScaleDeformableAttention`` (embed_dims=256,
    num_heads=8, num_levels=4, num_points=4, im2col_step=64, dropout=0.1,
    batch_first=False, norm_cfg=None, init_cfg=None, value_proj_ratio=1.0;
    im2col_step only matters for impl='mmcv' on CUDA), plus
    impl (str): 'ours' (default), 'pytorch' or 'mmcv'.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_heads: int = 8,
                 num_levels: int = 4,
                 num_points: int = 4,
                 im2col_step: int = 64,
                 dropout: float = 0.1,
                 batch_first: bool = False,
                 norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[mmengine.ConfigDict] = None,
                 value_proj_ratio: float = 1.0,
                 impl: str = 'ours'):
        if impl not in IMPLS:
            raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')
        super().__init__(
            embed_dims=embed_dims,
            num_heads=num_heads,
            num_levels=num_levels,
            num_points=num_points,
            im2col_step=im2col_step,
            dropout=dropout,
            batch_first=batch_first,
            norm_cfg=norm_cfg,
            init_cfg=init_cfg,
            value_proj_ratio=value_proj_ratio)
        self.impl = impl

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_heads={self.num_heads}, '
                f'num_levels={self.num_levels}, num_points={self.num_points}, '
                f'impl={self.impl!r}')

    def _sampling_locations(self, reference_points: torch.Tensor,
                            sampling_offsets: torch.Tensor,
                            spatial_shapes: torch.Tensor) -> torch.Tensor:
        """(bs, nq, nh, nl, np, 2) locations from reference points
        (bs, nq, nl, 2 or 4) and offsets (bs, nq, nh, nl, np, 2)."""
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H)
            normalizer = torch.stack(
                [spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            return reference_points[:, :, None, :, None, :] + \
                sampling_offsets / normalizer[None, None, None, :, None, :]
        if reference_points.shape[-1] == 4:
            # offsets relative to the reference box size
            return reference_points[:, :, None, :, None, :2] + \
                sampling_offsets / self.num_points * \
                reference_points[:, :, None, :, None, 2:] * 0.5
        raise ValueError('Last dim of reference_points must be 2 or 4, but '
                         f'get {reference_points.shape[-1]} instead.')

    def _sampling_locations_flat(self, reference_points: torch.Tensor,
                                 sampling_offsets: torch.Tensor,
                                 spatial_shapes: torch.Tensor) -> torch.Tensor:
        """:meth:`_sampling_locations` for export: the same elementwise
        operations on the same values in the same order (bitwise equal),
        in a layout that ONNX Runtime broadcasts fast.

        The eager form broadcasts the (W, H) normaliser and the reference
        points over heads and points with the (x, y) pair as the innermost
        axis: in ONNX, Div / Mul / Add whose broadcast repeats every 2
        elements, a slow case of ONNX Runtime's CPU kernels (15-17 % of the
        tiny DINO's ONNX Runtime time at batch 8). Here the offsets stay
        flat: the normaliser is expanded once to a (heads * levels * points
        * 2,) vector (one Div broadcast over whole rows), and the reference
        points are tiled over the points to (bs, nq, 1, levels * points *
        2) (an Add broadcast over the heads, 32 contiguous elements per
        repeat for 4 levels x 4 points). Export sets it on every module
        (``flat_sampling_locations`` of
        :mod:`projects_detr_plus.deployment.mmdet_patches`); eager code does
        not run it.
        """
        bs, num_query = sampling_offsets.shape[:2]
        heads, points = self.num_heads, self.num_points
        shape = sampling_offsets.shape
        # (bs, nq, heads, levels * points * 2)
        offsets = sampling_offsets.reshape(bs, num_query, heads, -1)

        def tiled(pairs):
            """(bs, nq, levels, 2) -> (bs, nq, 1, levels * points * 2), each
            level's pair repeated for its points."""
            return pairs.repeat(1, 1, 1, points).reshape(bs, num_query, 1, -1)

        if reference_points.shape[-1] == 2:
            # (levels, 2) in the dtype the eager division promotes to
            normalizer = torch.stack(
                [spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            normalizer = normalizer.to(
                torch.result_type(sampling_offsets, spatial_shapes))
            # (heads * levels * points * 2,)
            normalizer = normalizer.view(1, -1, 1, 2)
            normalizer = normalizer.expand(heads, -1, points, -1).reshape(-1)
            offsets = offsets.reshape(bs, num_query, -1) / normalizer
            return (tiled(reference_points) +
                    offsets.view(bs, num_query, heads, -1)).view(shape)
        if reference_points.shape[-1] == 4:
            return (tiled(reference_points[..., :2]) +
                    offsets / self.num_points *
                    tiled(reference_points[..., 2:]) * 0.5).view(shape)
        raise ValueError('Last dim of reference_points must be 2 or 4, but '
                         f'get {reference_points.shape[-1]} instead.')

    def _attend(self, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights) -> torch.Tensor:
        """(bs, nq, embed_dims) output of the selected op."""
        if self.impl == 'ours':
            return multi_scale_deformable_attn(value, spatial_shapes,
                                               level_start_index,
                                               sampling_locations,
                                               attention_weights)
        if self.impl == 'pytorch':
            return multi_scale_deformable_attn_pytorch(
                value, spatial_shapes, sampling_locations.to(value.dtype),
                attention_weights.to(value.dtype))
        if value.is_cuda:
            return MultiScaleDeformableAttnFunction.apply(
                value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, self.im2col_step)
        return mmcv_msda_pytorch(value, spatial_shapes, sampling_locations,
                                 attention_weights)

    @deprecated_api_warning({'residual': 'identity'},
                            cls_name='MultiScaleDeformableAttentionPlus')
    def forward(self,
                query: torch.Tensor,
                key: Optional[torch.Tensor] = None,
                value: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None,
                query_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None,
                reference_points: Optional[torch.Tensor] = None,
                spatial_shapes: Optional[torch.Tensor] = None,
                level_start_index: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        """Same arguments and result as mmcv's module.

        query (nq, bs, C) or (bs, nq, C) with batch_first; value likewise
        with num_keys = sum(H*W); key is unused; key_padding_mask (bs,
        num_keys) True for padding; reference_points (bs, nq, nl, 2 or 4) in
        [0, 1]; spatial_shapes (nl, 2) as (H, W); level_start_index (nl,).
        Returns dropout(output_proj(attention)) + identity, shaped as query.
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        # (sum(H*W) == num_value is checked by the op, without a GPU sync)

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, self.num_heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points, 2)
        attention_weights = self.attention_weights(query).view(
            bs, num_query, self.num_heads, self.num_levels * self.num_points)
        attention_weights = attention_weights.softmax(-1).view(
            bs, num_query, self.num_heads, self.num_levels, self.num_points)
        sampling_locations = self._sampling_locations(reference_points,
                                                      sampling_offsets,
                                                      spatial_shapes)
        output = self._attend(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity
