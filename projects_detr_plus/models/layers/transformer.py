"""Deformable-DETR and DINO transformer layers whose attention comes from
config.

mmdet's layers construct ``mmcv.ops.MultiScaleDeformableAttention`` directly.
These subclasses build the deformable attention through ``MODELS`` (default:
our :class:`MultiScaleDeformableAttentionPlus`), so a config can swap the op or
the attention module.  Module names, and hence state-dict keys, are mmdet's:
mmdet checkpoints load unchanged.

The DINO decoder also derives the sine embedding of the reference boxes from
``embed_dims`` instead of mmdet's fixed 128 features, so DINO works at any
width (e.g. 128 for the tiny shapes models).
"""
import torch
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import FFN, MultiheadAttention
from mmdet.models.layers import (DeformableDetrTransformerDecoder,
                                 DeformableDetrTransformerDecoderLayer,
                                 DeformableDetrTransformerEncoder,
                                 DeformableDetrTransformerEncoderLayer,
                                 DinoTransformerDecoder)
from mmdet.models.layers.transformer.utils import (MLP, coordinate_to_encoding,
                                                   inverse_sigmoid)
from mmdet.registry import MODELS
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention_layout import block_self_attention

DEFAULT_ATTENTION = 'MultiScaleDeformableAttentionPlus'


def build_deformable_attention(cfg):
    """Build a deformable attention from ``cfg`` (``type`` optional)."""
    cfg = dict(cfg)
    cfg.setdefault('type', DEFAULT_ATTENTION)
    return MODELS.build(cfg)


def build_ffn(cfg):
    """mmcv's ``FFN`` from ``cfg``, its ReLU out of place.

    In place (mmcv's default), the ReLU writes into the view that
    ``F.linear`` returns for 3-D input; autograd then copies the whole
    (tokens, feedforward) gradient back through that view (``CopySlices``)
    in the backward pass.  Measured on CPU (2 images x 5440 tokens, 256 ->
    2048, one thread): 2.9 s -> 2.3-2.7 s per FFN forward + backward; in
    DINO R50 at 512 px such copies were 17 % of the backward
    (``benchmarks/results/profile_dino-r50_cpu.json``).  Same values.
    """
    cfg = dict(cfg)
    act = dict(cfg.get('act_cfg') or dict(type='ReLU', inplace=True))
    if act.get('type') == 'ReLU':
        act['inplace'] = False
    cfg['act_cfg'] = act
    return FFN(**cfg)


def _norms(norm_cfg, embed_dims, count):
    return nn.ModuleList(
        [build_norm_layer(norm_cfg, embed_dims)[1] for _ in range(count)])


class CheckpointedLayer:
    """Mixin: with ``with_cp`` (set by the encoder's / decoder's
    ``num_cp``), in training, keep only the layer's inputs and recompute
    its activations in the backward pass (``torch.utils.checkpoint``): less
    memory, one more forward, same values and gradients."""
    with_cp = False

    def __call__(self, *args, **kwargs):
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(
                super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


class DeformableEncoderLayerPlus(CheckpointedLayer,
                                 DeformableDetrTransformerEncoderLayer):
    """Encoder layer: deformable self-attention (from config) + FFN."""

    def _init_layers(self):
        self.self_attn = build_deformable_attention(self.self_attn_cfg)
        self.embed_dims = self.self_attn.embed_dims
        self.ffn = build_ffn(self.ffn_cfg)
        self.norms = _norms(self.norm_cfg, self.embed_dims, 2)


class DeformableDecoderLayerPlus(CheckpointedLayer,
                                 DeformableDetrTransformerDecoderLayer):
    """Decoder layer: self-attention, deformable cross-attention, FFN."""

    def _init_layers(self):
        self.self_attn = MultiheadAttention(**self.self_attn_cfg)
        self.cross_attn = build_deformable_attention(self.cross_attn_cfg)
        self.embed_dims = self.self_attn.embed_dims
        self.ffn = build_ffn(self.ffn_cfg)
        self.norms = _norms(self.norm_cfg, self.embed_dims, 3)

    def forward(self,
                query,
                key=None,
                value=None,
                query_pos=None,
                key_pos=None,
                self_attn_mask=None,
                cross_attn_mask=None,
                key_padding_mask=None,
                **kwargs):
        """As mmdet's layer; ``self_attn_mask`` may also be a list of
        :class:`~.attention_layout.AttentionBlock` (query branches laid out
        by ``concat_query_sets``)."""
        query = block_self_attention(self.self_attn, query, query_pos,
                                     self_attn_mask, **kwargs)
        query = self.norms[0](query)
        query = self.cross_attn(
            query=query,
            key=key,
            value=value,
            query_pos=query_pos,
            key_pos=key_pos,
            attn_mask=cross_attn_mask,
            key_padding_mask=key_padding_mask,
            **kwargs)
        query = self.norms[1](query)
        return self.norms[2](self.ffn(query))


def _stack(layer_type, layer_cfg, num_layers, num_cp=-1):
    """``num_layers`` layers; the first ``num_cp`` with activation
    checkpointing (mmdet's encoder ``num_cp``, official Co-DETR's
    ``with_cp``, through torch instead of fairscale; same state-dict keys;
    <= 0, mmdet's default -1: none)."""
    if num_cp > num_layers:
        raise ValueError(f'num_cp ({num_cp}) is more than the {num_layers} '
                         'layers')
    layers = nn.ModuleList(
        [layer_type(**layer_cfg) for _ in range(num_layers)])
    for layer in layers[:max(num_cp, 0)]:
        layer.with_cp = True
    return layers


@MODELS.register_module()
class DeformableEncoderPlus(DeformableDetrTransformerEncoder):
    """Deformable-DETR encoder on :class:`DeformableEncoderLayerPlus`.

    ``num_cp`` (mmdet's argument): the first ``num_cp`` layers train with
    activation checkpointing (torch's, no fairscale needed; same outputs,
    gradients and state-dict keys, less memory).
    """

    def _init_layers(self):
        self.layers = _stack(DeformableEncoderLayerPlus, self.layer_cfg,
                             self.num_layers, self.num_cp)
        self.embed_dims = self.layers[0].embed_dims


@MODELS.register_module()
class DeformableDecoderPlus(DeformableDetrTransformerDecoder):
    """Deformable-DETR decoder on :class:`DeformableDecoderLayerPlus`.

    Args:
        look_forward_twice (bool): return each layer's refined boxes
            undetached, so that layer i's box loss also trains the
            refinement of layer i - 1 (DINO; H-Deformable-DETR's
            ``--look_forward_twice``).  The boxes fed to the next layer are
            detached either way.  False: mmdet's Deformable DETR.
        num_cp (int): the first ``num_cp`` layers train with activation
            checkpointing (as the encoder's; <= 0: none).
        **kwargs: as mmdet's ``DeformableDetrTransformerDecoder``.
    """

    def __init__(self, *args, look_forward_twice=False, num_cp=-1, **kwargs):
        self.look_forward_twice = look_forward_twice
        self.num_cp = num_cp
        super().__init__(*args, **kwargs)

    def _init_layers(self):
        self.layers = _stack(DeformableDecoderLayerPlus, self.layer_cfg,
                             self.num_layers, self.num_cp)
        self.embed_dims = self.layers[0].embed_dims
        if self.post_norm_cfg is not None:
            raise ValueError('There is no post_norm in '
                             f'{self._get_name()}')

    def forward(self,
                query,
                query_pos,
                value,
                key_padding_mask,
                reference_points,
                spatial_shapes,
                level_start_index,
                valid_ratios,
                reg_branches=None,
                **kwargs):
        """Decode ``query`` (bs, nq, dim) at ``query_pos`` (bs, nq, dim).

        Args:
            reference_points (Tensor): (bs, nq, 4) boxes or (bs, nq, 2)
                points, in [0, 1].
            reg_branches (nn.ModuleList, optional): box refinement heads.
            **kwargs: passed to every layer (``self_attn_mask``: a mask or
                the attention blocks of the query branches).
            Others: as mmdet's.

        Returns:
            tuple[Tensor, Tensor]: hidden states (num_layers, bs, nq, dim)
            and every layer's references (num_layers, bs, nq, 4 or 2) when
            ``return_intermediate``; else the last ones.
        """
        intermediate, intermediate_refs = [], []
        for layer_id, layer in enumerate(self.layers):
            ratios = valid_ratios if reference_points.shape[-1] == 2 else \
                torch.cat([valid_ratios, valid_ratios], -1)
            query = layer(
                query,
                query_pos=query_pos,
                value=value,
                key_padding_mask=key_padding_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                valid_ratios=valid_ratios,
                reference_points=reference_points[:, :, None] *
                ratios[:, None],
                **kwargs)
            refined = reference_points
            if reg_branches is not None:
                refined = _refine(reg_branches[layer_id](query),
                                  reference_points)
                reference_points = refined.detach()
            if self.return_intermediate:
                intermediate.append(query)
                intermediate_refs.append(
                    refined if self.look_forward_twice else reference_points)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_refs)
        return query, reference_points


def _refine(delta, reference_points):
    """Boxes (bs, nq, 4) refined by ``delta`` in inverse-sigmoid space;
    points (bs, nq, 2) move their centre only (mmdet's rule)."""
    if reference_points.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference_points)).sigmoid()
    centre = delta[..., :2] + inverse_sigmoid(reference_points)
    return torch.cat([centre, delta[..., 2:]], -1).sigmoid()


@MODELS.register_module()
class DinoDecoderPlus(DinoTransformerDecoder):
    """DINO decoder: look-forward-twice box refinement at any ``embed_dims``.

    Same parameters and outputs as mmdet's ``DinoTransformerDecoder``;
    ``num_cp``: the first ``num_cp`` layers train with activation
    checkpointing (<= 0: none).
    """

    def __init__(self, *args, num_cp=-1, **kwargs):
        self.num_cp = num_cp
        super().__init__(*args, **kwargs)

    def _init_layers(self):
        self.layers = _stack(DeformableDecoderLayerPlus, self.layer_cfg,
                             self.num_layers, self.num_cp)
        self.embed_dims = self.layers[0].embed_dims
        self.ref_point_head = MLP(self.embed_dims * 2, self.embed_dims,
                                  self.embed_dims, 2)
        self.norm = nn.LayerNorm(self.embed_dims)

    def forward(self,
                query,
                value,
                key_padding_mask,
                self_attn_mask,
                reference_points,
                spatial_shapes,
                level_start_index,
                valid_ratios,
                reg_branches,
                between_layers=None,
                **kwargs):
        """Decode ``query`` with iterative box refinement.

        Args:
            query (Tensor): (bs, num_queries, dim).
            value (Tensor): encoder memory, (bs, num_keys, dim).
            key_padding_mask (Tensor): (bs, num_keys), True at padding.
            self_attn_mask (Tensor | list | None): (num_queries,
                num_queries) bool, True where attention is blocked, or the
                attention blocks of the query branches (``concat_query_sets``).
            reference_points (Tensor): (bs, num_queries, 4) boxes as
                sigmoid-space (cx, cy, w, h).
            spatial_shapes, level_start_index, valid_ratios: as mmdet.
            reg_branches (nn.ModuleList): box refinement heads.
            between_layers (callable, optional): called after every layer
                but the last as ``between_layers(layer_id, query,
                reference_points, self_attn_mask)`` with the layer's output
                (bs, nq, dim) and refined boxes (bs, nq, 4); returns the
                self-attention layout of the next layer (DDQ's distinct
                query selection).

        Returns:
            tuple[Tensor, Tensor]: hidden states (num_layers, bs, nq, dim) and
            references (num_layers + 1, bs, nq, 4) when
            ``return_intermediate``; else the last ones.  The references of
            layer ``i + 1`` are undetached (look forward twice); the ones fed
            to the next layer are detached.
        """
        intermediate, intermediate_refs = [], [reference_points]
        for layer_id, layer in enumerate(self.layers):
            scaled_refs = reference_points[:, :, None] * torch.cat(
                [valid_ratios, valid_ratios], -1)[:, None]
            query_sine_embed = coordinate_to_encoding(
                scaled_refs[:, :, 0, :], num_feats=self.embed_dims // 2)
            query = layer(
                query,
                query_pos=self.ref_point_head(query_sine_embed),
                value=value,
                key_padding_mask=key_padding_mask,
                self_attn_mask=self_attn_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                valid_ratios=valid_ratios,
                reference_points=scaled_refs,
                **kwargs)
            if reg_branches is not None:
                refined = (
                    reg_branches[layer_id](query) +
                    inverse_sigmoid(reference_points, eps=1e-3))
                refined = refined.sigmoid()
                reference_points = refined.detach()
            if between_layers is not None and \
                    layer_id < len(self.layers) - 1:
                self_attn_mask = between_layers(layer_id, query,
                                                reference_points,
                                                self_attn_mask)
            if self.return_intermediate:
                intermediate.append(self.norm(query))
                intermediate_refs.append(refined)
        if self.return_intermediate:
            return torch.stack(intermediate), torch.stack(intermediate_refs)
        return query, reference_points
