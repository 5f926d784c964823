"""DINO on the query-branch architecture.

Same model as mmdet's ``DINO`` (parameters, state-dict keys, predictions,
losses) with three differences:

* layers from :mod:`..layers.transformer` (attention from config, any width);
* the decoder input is the main queries (mixed query selection: encoder top-k
  anchors + learnable content) plus every training branch's queries
  (:mod:`..branches`), run once under a block self-attention mask; each
  branch computes its own loss.  DINO's denoising is one such branch, and
  ``branches=[...]`` adds more (group, hybrid, ...);
* ``dn_cfg=None`` builds DINO without denoising; inference never runs any
  branch but the main one.

Group DETR (``GroupQueryBranch``) and H-DETR (``HybridMatchingBranch``) are
such branches: Group-DINO and H-DINO are this detector with a ``branches``
entry in the config.
"""
import torch
from mmdet.models.detectors import DINO, DeformableDETR
from mmdet.registry import MODELS
from mmengine.model import ModuleList
from torch import nn

from ..branches import (MAIN, BranchQueries, DenoisingBranch,
                        branch_layers, branch_predictions, concat_branches,
                        matched_set_loss, split_branches)
from ..layers.transformer import DeformableEncoderPlus, DinoDecoderPlus
from .deformable_detr import init_transformer_modules


@MODELS.register_module()
class DINOPlus(DINO):
    """DINO with pluggable training-time query branches.

    Args:
        dn_cfg (dict, optional): denoising branch config as mmdet's DINO
            (``label_noise_scale``, ``box_noise_scale``, ``group_cfg``), plus
            ``max_targets`` (see :class:`DenoisingBranch`).  None: no
            denoising.
        branches (list[dict], optional): further training branches, built
            through ``MODELS`` with ``num_classes``, ``embed_dims`` and
            ``num_matching_queries`` filled in by the detector.
        dense_self_attn_mask (bool): run the decoder self-attention of all
            branches as one masked attention over all queries, as the
            reference implementations do, instead of one attention per
            block of queries that see each other (groups folded into the
            batch).  Same result, more compute; for checks and benchmarks.
        *args, **kwargs: as mmdet's ``DINO``.
    """
    encoder_type = DeformableEncoderPlus
    decoder_type = DinoDecoderPlus

    def __init__(self, *args, dn_cfg=None, branches=(),
                 dense_self_attn_mask=False, **kwargs):
        # mmdet's DINO.__init__ requires dn_cfg; build the rest like it does.
        DeformableDETR.__init__(self, *args, **kwargs)
        if not (self.as_two_stage and self.with_box_refine):
            raise ValueError('DINO needs as_two_stage=True and '
                             'with_box_refine=True')
        self.dn_query_generator = None
        if dn_cfg is not None:
            self.dn_query_generator = DenoisingBranch(
                **self._branch_args(dn_cfg))
        # mmengine's ModuleList: init_weights reaches the branches' heads
        self.extra_branches = ModuleList(
            MODELS.build(self._branch_args(cfg)) for cfg in branches)
        self._check_branch_names()
        self.dense_self_attn_mask = dense_self_attn_mask

    def _check_branch_names(self):
        names = [b.name for b in self.training_branches]
        if len(set(names)) != len(names):
            raise ValueError(f'query branch names must be unique: {names}')

    def _branch_args(self, cfg):
        cfg = dict(cfg)
        for key in ('num_classes', 'embed_dims', 'num_matching_queries'):
            if key in cfg:
                raise ValueError(f'{key!r} is set by the detector; remove it '
                                 'from the branch config')
        cfg.update(num_classes=self.bbox_head.num_classes,
                   embed_dims=self.embed_dims,
                   num_matching_queries=self.num_queries)
        return cfg

    def _init_layers(self):
        init_transformer_modules(self)
        self.query_embedding = nn.Embedding(self.num_queries, self.embed_dims)
        self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
        self.memory_trans_norm = nn.LayerNorm(self.embed_dims)

    @property
    def training_branches(self):
        """The branches that add queries in training, in decoder order."""
        dn = [] if self.dn_query_generator is None else [
            self.dn_query_generator]
        return dn + list(self.extra_branches)

    def pre_decoder(self, memory, memory_mask, spatial_shapes,
                    batch_data_samples=None):
        """Main queries (encoder top-k) plus, in training, every branch's.

        Args:
            memory (Tensor): encoder output, (bs, num_keys, dim).
            memory_mask (Tensor): (bs, num_keys), True at padding.
            spatial_shapes (Tensor): (num_levels, 2) as (H, W).
            batch_data_samples (list[DetDataSample]): the batch.

        Returns:
            tuple[dict, dict]: decoder inputs (``query`` (bs, N, dim),
            ``reference_points`` (bs, N, 4) in [0, 1], ``dn_mask``: the
            self-attention layout of :func:`concat_branches`,
            ``branch_queries``: the list of :class:`BranchQueries`) and head
            inputs (training: the encoder's top-k scores and boxes and the
            branch queries).
        """
        inputs = self.query_inputs(memory, memory_mask, spatial_shapes)
        main, topk_score, topk_coords = self.main_queries(**inputs)
        parts = [main]
        if self.training:
            branch_parts = [
                branch.make_queries(main, batch_data_samples, **inputs)
                for branch in self.training_branches]
            # those that see the main queries share its attention block
            parts += sorted(branch_parts, key=lambda p: not p.sees_main)
        query, reference, attn_mask = concat_branches(
            parts, dense_mask=self.dense_self_attn_mask)
        decoder_inputs = dict(query=query, memory=memory,
                              reference_points=reference.sigmoid(),
                              dn_mask=attn_mask, branch_queries=parts)
        head_inputs = dict(enc_outputs_class=topk_score,
                           enc_outputs_coord=topk_coords,
                           branch_queries=parts) if self.training else {}
        return decoder_inputs, head_inputs

    def query_inputs(self, memory, memory_mask, spatial_shapes):
        """What the main queries and the branches are made from.

        Returns:
            dict: ``memory``, ``memory_mask``, ``spatial_shapes``, the
            two-stage proposals of every encoder token (``enc_class``
            logits (bs, num_keys, C), ``enc_coord_unact`` boxes before the
            sigmoid (bs, num_keys, 4)), the transformed tokens and anchors
            they come from (``enc_memory``, ``enc_anchors``) and ``head``.
        """
        head, num_layers = self.bbox_head, self.decoder.num_layers
        enc_memory, enc_anchors = self.gen_encoder_output_proposals(
            memory, memory_mask, spatial_shapes)
        enc_class = head.cls_branches[num_layers](enc_memory)
        enc_coord = head.reg_branches[num_layers](enc_memory) + enc_anchors
        return dict(memory=memory, memory_mask=memory_mask,
                    spatial_shapes=spatial_shapes, enc_class=enc_class,
                    enc_coord_unact=enc_coord, enc_memory=enc_memory,
                    enc_anchors=enc_anchors, head=head)

    def main_queries(self, enc_class, enc_coord_unact, **query_inputs):
        """Mixed query selection: top-k encoder anchors, learnable content.

        Returns:
            tuple: the main :class:`BranchQueries` (reference detached),
            top-k class scores (bs, k, num_classes) and top-k boxes
            (bs, k, 4) in [0, 1] (undetached, for the encoder loss).
        """
        topk = torch.topk(enc_class.max(-1)[0], k=self.num_queries, dim=1)[1]
        topk_score = torch.gather(
            enc_class, 1, topk[..., None].expand(-1, -1, enc_class.shape[-1]))
        topk_coords_unact = torch.gather(
            enc_coord_unact, 1, topk[..., None].expand(-1, -1, 4))
        content = self.query_embedding.weight[None].expand(
            enc_class.shape[0], -1, -1)
        main = BranchQueries(MAIN, content, topk_coords_unact.detach())
        return main, topk_score, topk_coords_unact.sigmoid()

    def forward_decoder(self, query, memory, memory_mask, reference_points,
                        spatial_shapes, level_start_index, valid_ratios,
                        dn_mask=None, branch_queries=None, **kwargs):
        """Run the decoder once over all branches' queries (see mmdet).

        ``branch_queries`` (from :meth:`pre_decoder`) say which box
        refinement each query uses (a branch may bring its own).
        """
        reg_branches = self.bbox_head.reg_branches
        if branch_queries is not None:
            reg_branches = branch_layers(branch_queries, reg_branches, 1)
        hidden_states, references = self.decoder(
            query=query, value=memory, key_padding_mask=memory_mask,
            self_attn_mask=dn_mask, reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index, valid_ratios=valid_ratios,
            reg_branches=reg_branches, **kwargs)
        return dict(hidden_states=hidden_states, references=list(references))

    def loss(self, batch_inputs, batch_data_samples):
        """Losses of the main branch, the encoder proposals and each branch."""
        img_feats = self.extract_feat(batch_inputs)
        head_inputs = self.forward_transformer(img_feats, batch_data_samples)
        return self.branch_losses(batch_data_samples=batch_data_samples,
                                  **head_inputs)

    def branch_losses(self, hidden_states, references, enc_outputs_class,
                      enc_outputs_coord, branch_queries, batch_data_samples,
                      **main_inputs):
        """Split the predictions by branch and sum up their losses.

        Args:
            hidden_states (Tensor): (num_layers, bs, N, dim).
            references (list[Tensor]): num_layers + 1 of (bs, N, 4).
            enc_outputs_class (Tensor): (bs, k, num_classes).
            enc_outputs_coord (Tensor): (bs, k, 4).
            branch_queries (list[BranchQueries]): main first.
            batch_data_samples (list[DetDataSample]): the batch.
            **main_inputs: more inputs of :meth:`main_loss` (returned by
                :meth:`forward_decoder`).
        """
        cls_scores, bbox_preds = branch_predictions(
            self.bbox_head, hidden_states, references, branch_queries)
        cls_parts = split_branches(cls_scores, branch_queries, dim=2)
        bbox_parts = split_branches(bbox_preds, branch_queries, dim=2)
        losses = self.main_loss(cls_parts[0], bbox_parts[0],
                                enc_outputs_class, enc_outputs_coord,
                                batch_data_samples, **main_inputs)
        branches = {branch.name: branch for branch in self.training_branches}
        for queries, cls, bbox in zip(branch_queries[1:], cls_parts[1:],
                                      bbox_parts[1:]):
            losses.update(branches[queries.name].loss(
                self.bbox_head, cls, bbox, queries, batch_data_samples))
        return losses

    def main_loss(self, cls_scores, bbox_preds, enc_cls, enc_coord,
                  batch_data_samples, **decoder_outputs):
        """One-to-one losses of every decoder layer and of the encoder."""
        head = self.bbox_head
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        losses = self.main_decoder_loss(cls_scores, bbox_preds, gts, metas,
                                        **decoder_outputs)
        enc_losses = head.loss_by_feat_single(
            enc_cls, enc_coord, batch_gt_instances=gts, batch_img_metas=metas)
        losses.update(zip(('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'),
                          enc_losses))
        return losses

    def main_decoder_loss(self, cls_scores, bbox_preds, batch_gt_instances,
                          batch_img_metas):
        """Hungarian loss of the main queries in every decoder layer."""
        return matched_set_loss(self.bbox_head, '', cls_scores, bbox_preds,
                                batch_gt_instances, batch_img_metas)
