"""Deformable DETR (plain, + box refinement, + two-stage) on our layers.

By default identical to mmdet's ``DeformableDETR`` (same parameters,
state-dict keys and outputs) except that the encoder and decoder are DETR+
layers whose deformable attention is built from config (default: our
compiled op).

Two-stage Deformable DETR is a :class:`~.query_detector.QueryBranchDetector`:
it carries the same training-time query branches as DINO
(``branches=[...]``), which is how H-Deformable-DETR (the official H-DETR)
is built.  Two options of the H-DETR code (``HDETR/H-Deformable-DETR``),
off by default as in mmdet:

* ``mixed_selection``: content queries from a learnable table (N(0, 1), as
  the official ``nn.Embedding``), positions from the proposals; without it
  both come from the proposals.  Branches need it: each brings its own
  content queries;
* the decoder's ``look_forward_twice`` (see
  :class:`~..layers.transformer.DeformableDecoderPlus`).
"""
import torch
from mmdet.models.detectors import DeformableDETR
from mmdet.models.layers import SinePositionalEncoding
from mmdet.registry import MODELS
from mmengine.structures import InstanceData
from torch import nn

from ..branches import learnable_content, query_set_layers, top_proposals
from ..layers.transformer import DeformableDecoderPlus, DeformableEncoderPlus
from .query_detector import QueryBranchDetector


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
class DeformableDETRPlus(QueryBranchDetector, DeformableDETR):
    """mmdet's Deformable DETR with configurable deformable attention and,
    when two-stage, query branches.

    Args:
        branches (list[dict]): training-only query branches (two-stage with
            ``mixed_selection`` only), as :class:`~.dino.DINOPlus`'s.
        mixed_selection (bool): learnable content queries, proposal
            positions (H-Deformable-DETR's ``--mixed_selection``).
        dense_self_attn_mask (bool): as :class:`~.dino.DINOPlus`.
        *args, **kwargs: as mmdet's ``DeformableDETR``; the encoder/decoder
            ``self_attn_cfg``/``cross_attn_cfg`` may name an attention
            ``type`` (default ``MultiScaleDeformableAttentionPlus``).
            ``with_box_refine`` and ``as_two_stage`` select the three
            variants.
    """
    encoder_type = DeformableEncoderPlus
    decoder_type = DeformableDecoderPlus

    def __init__(self,
                 *args,
                 branches=(),
                 mixed_selection=False,
                 dense_self_attn_mask=False,
                 **kwargs):
        self.mixed_selection = mixed_selection
        super().__init__(*args, **kwargs)
        if mixed_selection and not self.as_two_stage:
            raise ValueError('mixed_selection needs as_two_stage=True')
        if self.decoder.look_forward_twice and not self.with_box_refine:
            raise ValueError('decoder.look_forward_twice needs '
                             'with_box_refine=True (it returns the refined '
                             'boxes undetached)')
        if branches and not (self.as_two_stage and mixed_selection):
            raise ValueError(
                'query branches on Deformable DETR need as_two_stage=True '
                'and mixed_selection=True (a branch brings its own content '
                'queries)')
        self.build_branches(branches, dense_self_attn_mask)

    def _init_layers(self):
        init_transformer_modules(self)
        dims = self.embed_dims
        if self.as_two_stage:
            self.memory_trans_fc = nn.Linear(dims, dims)
            self.memory_trans_norm = nn.LayerNorm(dims)
            self.pos_trans_fc = nn.Linear(dims * 2, dims * 2)
            self.pos_trans_norm = nn.LayerNorm(dims * 2)
            if self.mixed_selection:
                self.query_embedding = nn.Embedding(self.num_queries, dims)
        else:
            # split into query and query_pos in pre_decoder
            self.query_embedding = nn.Embedding(self.num_queries, dims * 2)
            self.reference_points_fc = nn.Linear(dims, 2)

    def init_weights(self):
        """mmdet's, then the branches' content like the main content."""
        super().init_weights()
        self.init_branch_contents()

    def init_content(self, weight):
        """N(0, 1): ``nn.Embedding``'s default, which neither mmdet nor the
        official code changes for the mixed-selection table."""
        nn.init.normal_(weight)

    def pre_decoder(self,
                    memory,
                    memory_mask,
                    spatial_shapes,
                    batch_data_samples=None):
        """mmdet's single-stage queries, or the query-branch detector's."""
        if not self.as_two_stage:
            return DeformableDETR.pre_decoder(self, memory, memory_mask,
                                              spatial_shapes)
        return super().pre_decoder(memory, memory_mask, spatial_shapes,
                                   batch_data_samples)

    def proposal_score(self, enc_class):
        """Class 0's logit: the encoder is trained class-agnostic."""
        return enc_class[..., 0]

    def proposal_embedding(self, reference):
        """(query_pos, content), each (bs, n, dim), of reference boxes
        (bs, n, 4) before the sigmoid, as mmdet's two-stage (at any
        ``embed_dims``)."""
        embedding = self.pos_trans_norm(
            self.pos_trans_fc(
                self.get_proposal_pos_embed(
                    reference, num_pos_feats=self.embed_dims // 2)))
        return torch.split(embedding, self.embed_dims, dim=2)

    def query_positions(self, reference):
        return dict(query_pos=self.proposal_embedding(reference)[0])

    def select_proposals(self, enc_class, enc_coord_unact, enc_score=None):
        """The top-N proposals by ``enc_score`` (default
        :meth:`proposal_score`).

        Returns:
            tuple: reference boxes (bs, N, 4) before the sigmoid
            (undetached) and the encoder loss inputs: *every* token's
            logits (bs, num_keys, C) and boxes (bs, num_keys, 4) in [0, 1]
            (Deformable DETR's encoder loss covers all of them).
        """
        if enc_score is None:
            enc_score = self.proposal_score(enc_class)
        _, coords = top_proposals(enc_score, enc_class, enc_coord_unact,
                                  self.num_queries)
        return coords, (enc_class, enc_coord_unact.sigmoid())

    def main_content(self, reference):
        """From the learnable table (``mixed_selection``) or from the
        proposals (mmdet), (bs, N, dim)."""
        if self.mixed_selection:
            return learnable_content(self.query_embedding, reference.shape[0])
        return self.proposal_embedding(reference)[1]

    def forward_decoder(self,
                        query,
                        query_pos,
                        memory,
                        memory_mask,
                        reference_points,
                        spatial_shapes,
                        level_start_index,
                        valid_ratios,
                        attn_layout=None,
                        query_sets=None):
        """mmdet's, with the branches' attention layout and refinement.

        Returns:
            dict: ``hidden_states`` (num_layers, bs, N, dim) and
            ``references``: the initial and every layer's boxes.
        """
        reg_branches = None
        if self.with_box_refine:
            reg_branches = self.bbox_head.reg_branches
            if query_sets is not None:
                reg_branches = query_set_layers(query_sets, reg_branches,
                                                'reg')
        hidden_states, references = self.decoder(
            query=query,
            query_pos=query_pos,
            value=memory,
            key_padding_mask=memory_mask,
            self_attn_mask=attn_layout,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            reg_branches=reg_branches)
        return dict(
            hidden_states=hidden_states,
            references=[reference_points, *references])

    def loss(self, batch_inputs, batch_data_samples):
        """mmdet's head loss, or the main and branch losses (two-stage)."""
        if not self.as_two_stage:
            return DeformableDETR.loss(self, batch_inputs, batch_data_samples)
        return super().loss(batch_inputs, batch_data_samples)

    def encoder_gt_instances(self, batch_gt_instances):
        """Deformable DETR's encoder is trained class-agnostic: every
        token's proposal is matched to the ground truth as one class
        (labels 0)."""
        return [
            InstanceData(bboxes=gt.bboxes, labels=torch.zeros_like(gt.labels))
            for gt in batch_gt_instances
        ]
