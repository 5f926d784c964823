"""Stable-DINO's dense memory fusion: the encoder's input and every layer's
output, fused into the memory.

Stable-DINO (Liu et al., 2023, arXiv 2304.04742) concatenates the
encoder's input tokens and the output of each of its L layers along the
channels and maps them back with ``Linear((L + 1) * dim, dim)`` and a
``LayerNorm`` (official ``StableDINOTransformerEncoder`` with
``multi_level_fusion="dense-fusion"``, ``modeling/dino_transformer.py``).
The fused tokens are the memory: the proposals (query selection) and the
decoder's value are computed from them, so this changes the model and its
inference.

Select it with ``model.encoder.type='DenseFusionEncoder'`` on
:class:`~..detectors.dino.DINOPlus`; the fusion's state-dict keys are
``encoder.fusion_layer.{0,1}.*`` (the official names under
``transformer.``), every other key is the plain encoder's.
"""
import torch
from mmdet.registry import MODELS
from torch import nn

from .transformer import DeformableEncoderPlus


class DenseMemoryFusion(nn.Sequential):
    """``LayerNorm(Linear(cat(features, -1)))``; the linear's bias starts at
    0 (its weight gets the encoder's xavier-uniform), as the official.

    Args:
        embed_dims (int): channels of each feature and of the output.
        num_inputs (int): number of features fused (encoder layers + 1).
    """

    def __init__(self, embed_dims, num_inputs):
        super().__init__(
            nn.Linear(embed_dims * num_inputs, embed_dims),
            nn.LayerNorm(embed_dims))
        nn.init.constant_(self[0].bias, 0)

    def forward(self, features):
        """(bs, K, dim) from a list of ``num_inputs`` (bs, K, dim)."""
        return super().forward(torch.cat(features, dim=-1))


@MODELS.register_module()
class DenseFusionEncoder(DeformableEncoderPlus):
    """:class:`DeformableEncoderPlus` whose output is the dense fusion of
    its input and of every layer's output (:class:`DenseMemoryFusion`)."""

    def _init_layers(self):
        super()._init_layers()
        self.fusion_layer = DenseMemoryFusion(self.embed_dims,
                                              self.num_layers + 1)

    def forward(self, query, query_pos, key_padding_mask, spatial_shapes,
                level_start_index, valid_ratios, **kwargs):
        """As mmdet's encoder (same arguments), returning the fused
        memory (bs, K, dim)."""
        reference_points = self.get_encoder_reference_points(
            spatial_shapes, valid_ratios, device=query.device)
        features = [query]
        for layer in self.layers:
            query = layer(
                query=query,
                query_pos=query_pos,
                key_padding_mask=key_padding_mask,
                spatial_shapes=spatial_shapes,
                level_start_index=level_start_index,
                valid_ratios=valid_ratios,
                reference_points=reference_points,
                **kwargs)
            features.append(query)
        return self.fusion_layer(features)
