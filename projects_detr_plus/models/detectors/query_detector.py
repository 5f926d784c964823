"""The two-stage query detector: main queries plus training-time branches.

A two-stage DETR (Deformable DETR two-stage, DINO, DDQ-DETR) takes its main
decoder queries from the encoder's proposals.  :class:`QueryBranchDetector`
adds to any of them the branches of :mod:`..branches` (each a
:class:`~..branches.protocol.QueryBranch`), handing them a
:class:`~..branches.protocol.QueryContext` and itself as a
:class:`~..branches.protocol.QueryDetector`.  One training step::

    img -> backbone, neck -> encoder -> memory
      -> QueryContext(memory, proposals, [encoder_pyramid])
      -> main QuerySet (top-N proposals) + each branch's QuerySet
      -> concat_query_sets: queries, references, attention layout
      -> decoder (once, all sets) -> hidden states, references per layer
      -> set_predictions (each set by its predictors), split per set
      -> main: one-to-one loss per layer + encoder loss
         branches: loss of their own set; supervise_main on the main set

Every loss goes through the set-loss core (:mod:`..losses.set_losses`,
from :class:`~.query_losses.QueryLosses`).
Inference runs the main queries alone, filtered by
:class:`~.prediction_filter.PredictionFilter`.  What a detector defines:
``select_proposals`` (required: the main references among the proposals
and the inputs of its encoder loss), ``main_content(reference)`` (required
by the default ``main_queries``), and, with defaults, ``proposal_score``
(the best class logit), ``query_positions`` (none), ``encoder_loss``
(DINO's), ``main_keep`` (every query, every layer) and ``init_content``.
"""
import torch
from mmdet.registry import MODELS
from mmengine.model import ModuleList

from ..branches.protocol import QueryBranch, QueryContext
from ..branches.queries import (MAIN, QuerySet, concat_query_sets,
                                query_set_layers, split_query_sets)
from ..compat.finetune import drop_class_dependent_mismatches
from ..layers.pyramid import encoder_pyramid, extra_pyramid_level
from .prediction_filter import PredictionFilter
from .query_losses import QueryLosses


class QueryBranchDetector(QueryLosses, PredictionFilter):
    """Mixin for a two-stage mmdet ``DeformableDETR`` subclass.

    Put it first in the bases.  The detector calls :meth:`build_branches`
    at the end of its ``__init__``.
    """

    def build_branches(self, branches=(), dense_self_attn_mask=False):
        """Build the branches (``MODELS`` configs) and check them.

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
        if any(b.uses_encoder_pyramid for b in self.extra_branches):
            self.encoder_extra_level = extra_pyramid_level(self.embed_dims)
        self.dense_self_attn_mask = dense_self_attn_mask
        # checkpoints of the branches' official layouts are renamed first,
        # then fine-tuning drops the class-dependent weights that do not fit
        converters = {b.checkpoint_converter for b in self.extra_branches}
        for converter in converters - {None}:
            self.register_load_state_dict_pre_hook(converter)
        self.register_load_state_dict_pre_hook(drop_class_dependent_mismatches)

    def _check_branch_names(self):
        replacing = [
            b.name for b in self.training_branches if b.replaces_main_loss
        ]
        if len(replacing) > 1:
            raise ValueError('one branch at most may replace the main '
                             f'queries\' loss, got {replacing}')
        names = [b.name for b in self.training_branches]
        if len(set(names)) != len(names):
            raise ValueError(f'query branch names must be unique: {names}')

    @staticmethod
    def branch_class(cfg):
        """The class a branch config builds; a clear error if it is not a
        :class:`QueryBranch`."""
        branch_type = cfg.get('type')
        if isinstance(branch_type, str):
            branch_type = MODELS.get(branch_type)
        if not (isinstance(branch_type, type)
                and issubclass(branch_type, QueryBranch)):
            raise TypeError(f'branch type {cfg.get("type")!r} is not a '
                            'query branch: subclass branches.QueryBranch '
                            'and register it in mmdet.registry.MODELS')
        return branch_type

    def _branch_args(self, cfg):
        cfg = dict(cfg)
        if 'type' in cfg:
            self.branch_class(cfg)
        given = dict(
            num_classes=self.bbox_head.num_classes,
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
        """Every branch, in the order their query sets are decoded."""
        return list(self.extra_branches)

    def init_branch_contents(self):
        """Initialise every branch's content tables like the main ones."""
        for branch in self.extra_branches:
            for table in branch.content_tables():
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

    def pre_decoder(self,
                    memory,
                    memory_mask,
                    spatial_shapes,
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
            ``reference_points`` (bs, N, 4) in [0, 1], ``attn_layout``: the
            self-attention layout of :func:`concat_query_sets`,
            ``query_sets``: the list of :class:`QuerySet`, main first, plus
            :meth:`query_positions`) and head inputs (training: the
            encoder predictions of the encoder loss and the query sets).
        """
        context = self.query_context(memory, memory_mask, spatial_shapes)
        main, enc_cls, enc_coord = self.main_queries(context)
        query_sets = [main]
        if self.training:
            made = [
                branch.make_queries(main, context, self, batch_data_samples)
                for branch in self.training_branches
            ]
            # those that see the main queries share its attention block
            query_sets += sorted([q for q in made if q is not None],
                                 key=lambda q: not q.sees_main)
        query, reference, attn_layout = concat_query_sets(
            query_sets, dense_mask=self.dense_self_attn_mask)
        decoder_inputs = dict(
            query=query,
            memory=memory,
            reference_points=reference.sigmoid(),
            attn_layout=attn_layout,
            query_sets=query_sets,
            **self._positions(reference, query_sets))
        head_inputs = dict(
            enc_outputs_class=enc_cls,
            enc_outputs_coord=enc_coord,
            query_sets=query_sets) if self.training else {}
        return decoder_inputs, head_inputs

    def query_positions(self, reference):
        """Decoder inputs derived from every query's reference box
        (bs, N, 4, before the sigmoid); none by default."""
        return {}

    def _positions(self, reference, query_sets):
        """:meth:`query_positions`, with the ``query_pos`` of the branches
        that bring their own."""
        positions = self.query_positions(reference)
        own = [q.name for q in query_sets if q.query_pos is not None]
        if own and 'query_pos' not in positions:
            raise ValueError(f'branches {own} bring query_pos, which '
                             f'{type(self).__name__} does not use')
        if own:
            positions['query_pos'] = torch.cat([
                given if q.query_pos is None else q.query_pos
                for q, given in zip(
                    query_sets,
                    split_query_sets(
                        positions['query_pos'], query_sets, dim=1))
            ],
                                               dim=1)
        return positions

    def query_context(self, memory, memory_mask, spatial_shapes):
        """What the main queries and the branches are made from: the
        encoder outputs and the two-stage proposals of every token
        (:class:`QueryContext`)."""
        head, num_layers = self.bbox_head, self.decoder.num_layers
        enc_memory, enc_anchors = self.gen_encoder_output_proposals(
            memory, memory_mask, spatial_shapes)
        enc_class = head.cls_branches[num_layers](enc_memory)
        enc_coord = head.reg_branches[num_layers](enc_memory) + enc_anchors
        pyramid = None
        if self.training and hasattr(self, 'encoder_extra_level'):
            pyramid = encoder_pyramid(memory, spatial_shapes,
                                      self.encoder_extra_level)
        return QueryContext(
            memory=memory,
            memory_mask=memory_mask,
            spatial_shapes=spatial_shapes,
            enc_class=enc_class,
            enc_coord_unact=enc_coord,
            enc_score=self.proposal_score(enc_class),
            enc_memory=enc_memory,
            enc_anchors=enc_anchors,
            encoder_pyramid=pyramid)

    def proposal_score(self, enc_class):
        """(bs, num_keys) score the top-k ranks proposals by: the best
        class logit (DINO)."""
        return enc_class.max(-1)[0]

    def main_queries(self, context):
        """The top-N encoder proposals (detached) and their content.

        Returns:
            tuple: the main ``QuerySet`` and the encoder predictions of
            the encoder loss (see :meth:`select_proposals`).
        """
        coords, (enc_cls,
                 enc_coord) = self.select_proposals(context.enc_class,
                                                    context.enc_coord_unact,
                                                    context.enc_score)
        reference = coords.detach()
        main = QuerySet(MAIN, self.main_content(reference), reference)
        return main, enc_cls, enc_coord

    def forward_decoder(self,
                        query,
                        memory,
                        memory_mask,
                        reference_points,
                        spatial_shapes,
                        level_start_index,
                        valid_ratios,
                        attn_layout=None,
                        query_sets=None,
                        **kwargs):
        """Run the decoder once over all branches' queries.

        ``query_sets`` (from :meth:`pre_decoder`) say which box
        refinement each query uses (a branch may bring its own).
        """
        reg_branches = self.bbox_head.reg_branches
        if query_sets is not None:
            reg_branches = query_set_layers(query_sets, reg_branches, 'reg')
        hidden_states, references = self.decoder(
            query=query,
            value=memory,
            key_padding_mask=memory_mask,
            self_attn_mask=attn_layout,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            reg_branches=reg_branches,
            **kwargs)
        return dict(hidden_states=hidden_states, references=list(references))


__all__ = ['QueryBranchDetector']
