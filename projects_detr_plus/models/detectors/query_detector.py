"""The two-stage query detector: main queries plus training-only branches.

A two-stage DETR (Deformable DETR two-stage, DINO, DDQ-DETR) takes its main
decoder queries from the encoder's proposals.  :class:`QueryBranchDetector`
adds to any of them the training-time query branches of :mod:`..branches`
(DINO's denoising, Group DETR, H-DETR, Co-DETR, DDQ's dense queries): it
asks every branch for its queries, runs the decoder once over their
concatenation under a block self-attention layout, splits the predictions
and sums the branches' losses.  Inference runs the main queries alone.

What a detector defines (DINO and Deformable DETR differ only there):

* ``select_proposals(enc_class, enc_coord_unact, enc_score=None)``: the
  main queries' reference boxes among the encoder proposals, and the inputs
  of its encoder loss (required);
* ``proposal_score(enc_class)``: what proposals are ranked by (default: the
  best class logit);
* ``main_content(reference)``: the main queries' content (required by the
  default ``main_queries``, which DDQ replaces);
* ``query_positions(reference)``: extra decoder inputs derived from the
  reference boxes of all queries (Deformable DETR's ``query_pos``);
* ``encoder_loss(enc_cls, enc_coord, gts, metas)`` and
  ``main_decoder_loss(...)`` (defaults: DINO's);
* ``init_content(weight)``: initialises a branch's content table the way
  the main content queries are initialised.

Branches that train heads on the encoder output as a feature pyramid
(Co-DETR's, ``uses_encoder_pyramid``) share one extra stride-2 level,
``encoder_extra_level``, and get ``encoder_pyramid`` among their inputs.
At test time ``test_cfg.nms`` (e.g. official Co-DINO's soft-NMS) and
``test_cfg.score_thr`` filter the predictions.
"""
import torch
from mmcv.ops import batched_nms
from mmdet.registry import MODELS
from mmengine.model import ModuleList

from ..branches import (MAIN, BranchQueries, branch_layers,
                        branch_predictions, concat_branches, matched_set_loss,
                        split_branches)
from ..branches.collaborative import encoder_pyramid, extra_pyramid_level
from ..finetune import drop_class_dependent_mismatches
from ..official_checkpoints import convert_official_co_detr


class QueryBranchDetector:
    """Mixin for a two-stage mmdet ``DeformableDETR`` subclass.

    Put it first in the bases.  The detector calls :meth:`build_branches`
    at the end of its ``__init__``.
    """

    def build_branches(self, branches=(), dense_self_attn_mask=False):
        """Build the branches (``MODELS`` configs) and check their names.

        Args:
            branches (list[dict]): branch configs; ``num_classes``,
                ``embed_dims`` and ``num_matching_queries`` are filled in.
            dense_self_attn_mask (bool): one masked attention over all
                queries instead of one attention per block (checks and
                benchmarks; same result).
        """
        # mmengine's ModuleList: init_weights reaches the branches' heads
        self.extra_branches = ModuleList(
            MODELS.build(self._branch_args(cfg)) for cfg in branches)
        self._check_branch_names()
        if any(getattr(b, 'uses_encoder_pyramid', False)
               for b in self.extra_branches):
            self.encoder_extra_level = extra_pyramid_level(self.embed_dims)
        self.dense_self_attn_mask = dense_self_attn_mask
        # official Co-DETR checkpoints are renamed first, then fine-tuning
        # drops the class-dependent weights that do not fit
        self.register_load_state_dict_pre_hook(convert_official_co_detr)
        self.register_load_state_dict_pre_hook(
            drop_class_dependent_mismatches)

    def _check_branch_names(self):
        names = [b.name for b in self.training_branches]
        if len(set(names)) != len(names):
            raise ValueError(f'query branch names must be unique: {names}')

    def _branch_args(self, cfg):
        cfg = dict(cfg)
        given = dict(num_classes=self.bbox_head.num_classes,
                     embed_dims=self.embed_dims,
                     num_matching_queries=self.num_queries)
        where = cfg.get('type', 'dn_cfg')
        for key, value in given.items():
            if key in cfg:
                raise ValueError(
                    f'{where}: {key}={cfg[key]!r} is set by the detector '
                    f'({key}={value}, from bbox_head / the detector); remove '
                    'it from the branch config')
        cfg.update(given)
        return cfg

    @property
    def training_branches(self):
        """The branches that add queries in training, in decoder order."""
        return list(self.extra_branches)

    def init_branch_contents(self):
        """Initialise every branch's content tables like the main ones."""
        for branch in self.extra_branches:
            for table in getattr(branch, 'content_tables', lambda: ())():
                self.init_content(table)

    def forward_transformer(self, img_feats, batch_data_samples=None):
        """As mmdet's, with the batch passed on to :meth:`pre_decoder`."""
        encoder_inputs, decoder_inputs = self.pre_transformer(
            img_feats, batch_data_samples)
        encoder_outputs = self.forward_encoder(**encoder_inputs)
        more_decoder_inputs, head_inputs = self.pre_decoder(
            **encoder_outputs, batch_data_samples=batch_data_samples)
        decoder_inputs.update(more_decoder_inputs)
        head_inputs.update(self.forward_decoder(**decoder_inputs))
        return head_inputs

    def pre_decoder(self, memory, memory_mask, spatial_shapes,
                    batch_data_samples=None):
        """Main queries (encoder proposals) plus, in training, every
        branch's.

        Args:
            memory (Tensor): encoder output, (bs, num_keys, dim).
            memory_mask (Tensor): (bs, num_keys), True at padding.
            spatial_shapes (Tensor): (num_levels, 2) as (H, W).
            batch_data_samples (list[DetDataSample]): the batch.

        Returns:
            tuple[dict, dict]: decoder inputs (``query`` (bs, N, dim),
            ``reference_points`` (bs, N, 4) in [0, 1], ``dn_mask``: the
            self-attention layout of :func:`concat_branches`,
            ``branch_queries``: the list of :class:`BranchQueries`, plus
            :meth:`query_positions`) and head inputs (training: the
            encoder predictions of the encoder loss and the branch queries).
        """
        inputs = self.query_inputs(memory, memory_mask, spatial_shapes)
        main, enc_cls, enc_coord = self.main_queries(**inputs)
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
                              dn_mask=attn_mask, branch_queries=parts,
                              **self._positions(reference, parts))
        head_inputs = dict(enc_outputs_class=enc_cls,
                           enc_outputs_coord=enc_coord,
                           branch_queries=parts) if self.training else {}
        return decoder_inputs, head_inputs

    def query_positions(self, reference):
        """Decoder inputs derived from every query's reference box
        (bs, N, 4, before the sigmoid); none by default."""
        return {}

    def _positions(self, reference, parts):
        """:meth:`query_positions`, with the ``query_pos`` of the branches
        that bring their own."""
        positions = self.query_positions(reference)
        own = [p.name for p in parts if p.query_pos is not None]
        if own and 'query_pos' not in positions:
            raise ValueError(f'branches {own} bring query_pos, which '
                             f'{type(self).__name__} does not use')
        if own:
            positions['query_pos'] = torch.cat([
                given if p.query_pos is None else p.query_pos
                for p, given in zip(parts, split_branches(
                    positions['query_pos'], parts, dim=1))], dim=1)
        return positions

    def query_inputs(self, memory, memory_mask, spatial_shapes):
        """What the main queries and the branches are made from.

        Returns:
            dict: ``memory``, ``memory_mask``, ``spatial_shapes``, the
            two-stage proposals of every encoder token (``enc_class``
            logits (bs, num_keys, C), ``enc_coord_unact`` boxes before the
            sigmoid (bs, num_keys, 4)), their ranking score
            (``enc_score`` (bs, num_keys): what the main top-k ranks by), the
            transformed tokens and anchors they come from (``enc_memory``,
            ``enc_anchors``) and ``head``.
        """
        head, num_layers = self.bbox_head, self.decoder.num_layers
        enc_memory, enc_anchors = self.gen_encoder_output_proposals(
            memory, memory_mask, spatial_shapes)
        enc_class = head.cls_branches[num_layers](enc_memory)
        enc_coord = head.reg_branches[num_layers](enc_memory) + enc_anchors
        more = {}
        if self.training and hasattr(self, 'encoder_extra_level'):
            more['encoder_pyramid'] = encoder_pyramid(
                memory, spatial_shapes, self.encoder_extra_level)
        return dict(memory=memory, memory_mask=memory_mask, **more,
                    spatial_shapes=spatial_shapes, enc_class=enc_class,
                    enc_coord_unact=enc_coord,
                    enc_score=self.proposal_score(enc_class),
                    enc_memory=enc_memory, enc_anchors=enc_anchors,
                    head=head, select_proposals=self.select_proposals,
                    encoder_loss=self.encoder_loss)

    def proposal_score(self, enc_class):
        """(bs, num_keys) score the top-k ranks proposals by: the best
        class logit (DINO)."""
        return enc_class.max(-1)[0]

    def main_queries(self, enc_class, enc_coord_unact, enc_score,
                     **query_inputs):
        """The top-N encoder proposals (detached) and their content.

        Returns:
            tuple: the main ``BranchQueries`` and the encoder predictions of
            the encoder loss (see :meth:`select_proposals`).
        """
        coords, (enc_cls, enc_coord) = self.select_proposals(
            enc_class, enc_coord_unact, enc_score)
        reference = coords.detach()
        main = BranchQueries(MAIN, self.main_content(reference), reference)
        return main, enc_cls, enc_coord

    def forward_decoder(self, query, memory, memory_mask, reference_points,
                        spatial_shapes, level_start_index, valid_ratios,
                        dn_mask=None, branch_queries=None, **kwargs):
        """Run the decoder once over all branches' queries.

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

    def predict(self, batch_inputs, batch_data_samples, rescale=True):
        """mmdet's predictions (the top ``max_per_img`` (query, class)
        pairs), then, as the official Co-DINO:

        * without those scoring at most ``test_cfg.score_thr`` (default 0:
          all kept, as mmdet; COCO mAP wants them all, deployment usually
          does not);
        * ``test_cfg.nms`` (default none, NMS-free): an mmcv
          ``batched_nms`` config (per class), e.g. ``dict(type='soft_nms',
          iou_threshold=0.8)``; scores become the NMS's (soft-NMS decays
          them), at most ``max_per_img`` kept.
        """
        samples = super().predict(batch_inputs, batch_data_samples, rescale)
        test_cfg = self.test_cfg or {}
        threshold = test_cfg.get('score_thr', 0.0)
        for sample in samples:
            instances = sample.pred_instances
            if threshold > 0:
                instances = instances[instances.scores > threshold]
            if test_cfg.get('nms') and len(instances):
                instances = self._nms(instances, test_cfg)
            sample.pred_instances = instances
        return samples

    @staticmethod
    def _nms(instances, test_cfg):
        """``test_cfg.nms`` on (n, ) predictions, best first."""
        dets, keep = batched_nms(instances.bboxes, instances.scores,
                                 instances.labels, dict(test_cfg['nms']))
        instances = instances[keep]
        instances.scores = dets[:, -1]
        return instances[:test_cfg.get('max_per_img', len(instances))]

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
            enc_outputs_class (Tensor): (bs, k, num_classes), the encoder
                predictions of the encoder loss (DINO: the top k;
                Deformable DETR: every token, k = num_keys).
            enc_outputs_coord (Tensor): (bs, k, 4) in [0, 1].
            branch_queries (list[BranchQueries]): main first.
            batch_data_samples (list[DetDataSample]): the batch.
            **main_inputs: more inputs of :meth:`main_loss` (returned by
                :meth:`forward_decoder`).

        A branch with a ``main_loss_weight`` (Group DETR: 1 / K) scales the
        losses of the main queries (decoder, encoder) and of the branches
        that belong to them (``belongs_to_main``: DINO's denoising).
        """
        cls_scores, bbox_preds = branch_predictions(
            self.bbox_head, hidden_states, references, branch_queries)
        cls_parts = split_branches(cls_scores, branch_queries, dim=2)
        bbox_parts = split_branches(bbox_preds, branch_queries, dim=2)
        main_losses = self.main_loss(cls_parts[0], bbox_parts[0],
                                     enc_outputs_class, enc_outputs_coord,
                                     batch_data_samples, **main_inputs)
        other_losses = {}
        branches = {branch.name: branch for branch in self.training_branches}
        for queries, cls, bbox in zip(branch_queries[1:], cls_parts[1:],
                                      bbox_parts[1:]):
            branch = branches[queries.name]
            losses = branch.loss(self.bbox_head, cls, bbox, queries,
                                 batch_data_samples)
            if getattr(branch, 'belongs_to_main', False):
                main_losses.update(losses)
            else:
                other_losses.update(losses)
        weight = 1.0
        for branch in self.training_branches:
            weight *= getattr(branch, 'main_loss_weight', 1.0)
        if weight != 1.0:
            main_losses = {k: v * weight for k, v in main_losses.items()}
        return dict(main_losses, **other_losses)

    def main_loss(self, cls_scores, bbox_preds, enc_cls, enc_coord,
                  batch_data_samples, **decoder_outputs):
        """One-to-one losses of every decoder layer and of the encoder."""
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        losses = self.main_decoder_loss(cls_scores, bbox_preds, gts, metas,
                                        **decoder_outputs)
        losses.update(self.encoder_loss(enc_cls, enc_coord, gts, metas))
        return losses

    def encoder_loss(self, enc_cls, enc_coord, batch_gt_instances,
                     batch_img_metas):
        """DINO's: the one-to-one loss of the top-k proposals, with classes.

        Args:
            enc_cls (Tensor): (bs, k, num_classes) logits.
            enc_coord (Tensor): (bs, k, 4) boxes in [0, 1].
        """
        enc_losses = self.bbox_head.loss_by_feat_single(
            enc_cls, enc_coord, batch_gt_instances=batch_gt_instances,
            batch_img_metas=batch_img_metas)
        return dict(zip(('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'),
                        enc_losses))

    def main_decoder_loss(self, cls_scores, bbox_preds, batch_gt_instances,
                          batch_img_metas):
        """Hungarian loss of the main queries in every decoder layer."""
        return matched_set_loss(self.bbox_head, '', cls_scores, bbox_preds,
                                batch_gt_instances, batch_img_metas)


__all__ = ['QueryBranchDetector']
