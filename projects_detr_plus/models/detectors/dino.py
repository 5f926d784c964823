"""DINO on the query-branch architecture.

Same model as mmdet's ``DINO`` (parameters, state-dict keys, predictions,
losses) with four differences:

* layers from :mod:`..layers.transformer` (attention from config, any width);
* the decoder input is the main queries (mixed query selection: encoder top-k
  anchors + learnable content) plus every training branch's queries
  (:mod:`..branches`), run once under a block self-attention mask; each
  branch computes its own loss.  DINO's denoising is one such branch, and
  ``branches=[...]`` adds more (group, hybrid, ...);
* ``dn_cfg=None`` builds DINO without denoising; inference never runs any
  branch but the main one;
* ``encoder=dict(type=...)`` may name another registered encoder class
  (Stable-DINO's :class:`~..layers.memory_fusion.DenseFusionEncoder`);
  without a ``type``, our :class:`DeformableEncoderPlus`.

Group DETR (``GroupQueryBranch``) and H-DETR (``HybridMatchingBranch``) are
such branches: Group-DINO and H-DINO are this detector with a ``branches``
entry in the config.  The branch machinery is
:class:`~.query_detector.QueryBranchDetector`'s, shared with
:class:`~.deformable_detr.DeformableDETRPlus`.
"""
from mmdet.models.detectors import DINO, DeformableDETR
from mmdet.registry import MODELS
from torch import nn

from ..branches import DenoisingBranch, learnable_content, top_proposals
from ..layers.transformer import DeformableEncoderPlus, DinoDecoderPlus
from .deformable_detr import init_transformer_modules
from .query_detector import QueryBranchDetector


@MODELS.register_module()
class DINOPlus(QueryBranchDetector, DINO):
    """DINO with pluggable training-time query branches.

    Args:
        dn_cfg (dict, optional): denoising branch config as mmdet's DINO
            (``label_noise_scale``, ``box_noise_scale``, ``group_cfg``), plus
            ``max_targets`` (see :class:`DenoisingBranch`).  None: no
            denoising.  Branches that denoise too (Group DETR's groups) get
            it as their ``dn_cfg``.
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

    def __init__(self,
                 *args,
                 dn_cfg=None,
                 branches=(),
                 dense_self_attn_mask=False,
                 content_init='xavier_uniform',
                 **kwargs):
        if content_init not in ('xavier_uniform', 'normal'):
            raise ValueError("content_init must be 'xavier_uniform' or "
                             f"'normal', got {content_init!r}")
        # mmdet's DINO.__init__ requires dn_cfg; build the rest like it does.
        DeformableDETR.__init__(self, *args, **kwargs)
        if not (self.as_two_stage and self.with_box_refine):
            raise ValueError('DINO needs as_two_stage=True and '
                             'with_box_refine=True')
        self.content_init = content_init
        self.dn_cfg = None if dn_cfg is None else dict(dn_cfg)
        self.dn_query_generator = None
        if dn_cfg is not None:
            self.dn_query_generator = DenoisingBranch(
                **self._branch_args(dn_cfg))
        self.build_branches(branches, dense_self_attn_mask)

    def _branch_args(self, cfg):
        cfg = super()._branch_args(cfg)
        if 'type' in cfg and self.branch_class(cfg).takes_dn_cfg:
            cfg.setdefault('dn_cfg', self.dn_cfg)
        return cfg

    def _init_layers(self):
        encoder = dict(self.encoder)
        encoder_type = encoder.pop('type', None)
        if encoder_type is not None:  # the config's encoder class
            self.encoder_type = MODELS.get(encoder_type) if isinstance(
                encoder_type, str) else encoder_type
            if self.encoder_type is None:
                raise KeyError(f'encoder type {encoder_type!r} is not '
                               'registered in mmdet.registry.MODELS')
            self.encoder = encoder
        init_transformer_modules(self)
        self.query_embedding = nn.Embedding(self.num_queries, self.embed_dims)
        self.memory_trans_fc = nn.Linear(self.embed_dims, self.embed_dims)
        self.memory_trans_norm = nn.LayerNorm(self.embed_dims)

    def init_weights(self):
        """mmdet's, then the content queries per ``content_init`` and the
        branches' content like the main content."""
        super().init_weights()
        if self.content_init == 'normal':
            nn.init.normal_(self.query_embedding.weight)
        self.init_branch_contents()

    def init_content(self, weight):
        """A branch's table gets the main content's distribution, whatever
        its number of rows (xavier-uniform: that of the (N, dim) table)."""
        if self.content_init == 'normal':
            nn.init.normal_(weight)
            return
        bound = (6.0 / (self.num_queries + self.embed_dims))**0.5
        nn.init.uniform_(weight, -bound, bound)

    @property
    def training_branches(self):
        """The branches that add queries in training, in decoder order."""
        dn = [] if self.dn_query_generator is None else [
            self.dn_query_generator
        ]
        return dn + list(self.extra_branches)

    def select_proposals(self, enc_class, enc_coord_unact, enc_score=None):
        """Mixed query selection: the top-N encoder proposals by
        ``enc_score`` (default :meth:`proposal_score`).

        Args:
            enc_class (Tensor): (bs, num_keys, C) logits.
            enc_coord_unact (Tensor): (bs, num_keys, 4) before the sigmoid.
            enc_score (Tensor, optional): (bs, num_keys).

        Returns:
            tuple: reference boxes (bs, N, 4) before the sigmoid
            (undetached) and the encoder loss inputs: their logits
            (bs, N, C) and boxes (bs, N, 4) in [0, 1].
        """
        if enc_score is None:
            enc_score = self.proposal_score(enc_class)
        scores, coords = top_proposals(enc_score, enc_class, enc_coord_unact,
                                       self.num_queries)
        return coords, (scores, coords.sigmoid())

    def main_content(self, reference):
        """Learnable content queries (bs, N, dim)."""
        return learnable_content(self.query_embedding, reference.shape[0])
