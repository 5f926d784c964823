"""Deformable DETR (plain, + box refinement, + two-stage) on our layers.

Identical to mmdet's ``DeformableDETR`` (same parameters, state-dict keys and
outputs) except that the encoder and decoder are DETR+ layers whose deformable
attention is built from config (default: our compiled op).
"""
import torch
from mmdet.models.detectors import DeformableDETR
from mmdet.models.layers import SinePositionalEncoding
from mmdet.registry import MODELS
from torch import nn

from ..layers.transformer import DeformableDecoderPlus, DeformableEncoderPlus


def init_transformer_modules(detector):
    """Build positional encoding, encoder, decoder and level embeddings.

    The part of mmdet's ``_init_layers`` shared by Deformable DETR and DINO,
    with the encoder/decoder classes taken from ``detector.encoder_type`` and
    ``detector.decoder_type``.
    """
    detector.positional_encoding = SinePositionalEncoding(
        **detector.positional_encoding)
    detector.encoder = detector.encoder_type(**detector.encoder)
    detector.decoder = detector.decoder_type(**detector.decoder)
    detector.embed_dims = detector.encoder.embed_dims
    num_feats = detector.positional_encoding.num_feats
    if num_feats * 2 != detector.embed_dims:
        raise ValueError(f'positional_encoding.num_feats ({num_feats}) must '
                         f'be half of embed_dims ({detector.embed_dims})')
    detector.level_embed = nn.Parameter(
        torch.Tensor(detector.num_feature_levels, detector.embed_dims))


@MODELS.register_module()
class DeformableDETRPlus(DeformableDETR):
    """mmdet's Deformable DETR with configurable deformable attention.

    Config: as mmdet's ``DeformableDETR``; the encoder/decoder
    ``self_attn_cfg``/``cross_attn_cfg`` may name an attention ``type``
    (default ``MultiScaleDeformableAttentionPlus``).  ``with_box_refine`` and
    ``as_two_stage`` select the three variants.
    """
    encoder_type = DeformableEncoderPlus
    decoder_type = DeformableDecoderPlus

    def _init_layers(self):
        init_transformer_modules(self)
        dims = self.embed_dims
        if self.as_two_stage:
            self.memory_trans_fc = nn.Linear(dims, dims)
            self.memory_trans_norm = nn.LayerNorm(dims)
            self.pos_trans_fc = nn.Linear(dims * 2, dims * 2)
            self.pos_trans_norm = nn.LayerNorm(dims * 2)
        else:
            # split into query and query_pos in pre_decoder
            self.query_embedding = nn.Embedding(self.num_queries, dims * 2)
            self.reference_points_fc = nn.Linear(dims, 2)
