"""The branch contract: what a training trick of the DETR family declares.

A branch is *queries (optional) + targets + loss*.  It may add a set of
decoder queries with their own targets (DINO's denoising, Group DETR,
H-DETR, Co-DETR, DDQ's dense queries), supervise the main queries
differently (MS-DETR-, Align-DETR-, Stable-DINO-style tricks), or both.
The detector (:class:`~..detectors.query_detector.QueryBranchDetector`)
runs one training step as::

    context = QueryContext(...)                 # encoder outputs, proposals
    main = detector.main_queries(context)       # QuerySet 'main'
    sets = [main] + [b.make_queries(main, context, detector, batch)
                     for b in branches]         # None: adds no queries
    decoder over concat(sets) under their attention layout
    for each branch with queries: b.loss(detector, its predictions, ...)
    for each branch:              b.supervise_main(detector, main's, ...)

Every hook has a default here, so a branch overrides only what it adds.
What a branch may use of the detector is :class:`QueryDetector`; nothing
else travels between them (no callables in the context, nothing in
``img_meta``).
"""
from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

from mmengine.model import BaseModule
from torch import Tensor, nn

from .queries import QuerySet


@dataclass
class QueryContext:
    """What the main queries and the branches are made from (one forward).

    Attributes:
        memory (Tensor): encoder output, (bs, K, dim).
        memory_mask (Tensor): (bs, K), True at padding.
        spatial_shapes (Tensor): (num_levels, 2) as (H, W).
        enc_class (Tensor): two-stage proposal logits of every token,
            (bs, K, C).
        enc_coord_unact (Tensor): their boxes before the sigmoid, (bs, K, 4).
        enc_score (Tensor): (bs, K), what the main top-k ranks them by
            (DINO: the best class logit; Deformable DETR: class 0's).
        enc_memory (Tensor): the transformed tokens the proposals come
            from, (bs, K, dim).
        enc_anchors (Tensor): their anchors before the sigmoid, (bs, K, 4),
            inf at padding and invalid tokens.
        encoder_pyramid (tuple[Tensor] | None): the memory as (bs, dim, h, w)
            maps plus one stride-2 level (:mod:`..layers.pyramid`); only
            when a branch declares ``uses_encoder_pyramid``.
        token_content (Tensor | None): (bs, K, dim), the content query every
            token would give (DDQ-DETR).
    """
    memory: Tensor
    memory_mask: Tensor
    spatial_shapes: Tensor
    enc_class: Tensor
    enc_coord_unact: Tensor
    enc_score: Tensor
    enc_memory: Tensor
    enc_anchors: Tensor
    encoder_pyramid: Optional[Tuple[Tensor, ...]] = None
    token_content: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]


@dataclass
class SetPredictions:
    """The decoder's outputs on one query set, every layer.

    Attributes:
        cls_scores (Tensor): (num_layers, bs, n, num_classes) logits.
        bbox_preds (Tensor): (num_layers, bs, n, 4), normalised cxcywh.
        hidden_states (Tensor): (num_layers, bs, n, dim).
        references (list[Tensor]): num_layers (+ 1) of (bs, n, 4) in [0, 1]:
            the boxes each layer refined (layer i predicts on
            ``references[i]``).
        keep (list[Tensor | None]): per layer, (bs, n) bool: the queries
            that layer is trained and predicts on (DDQ-DETR's distinct
            queries); None: all of them.
    """
    cls_scores: Tensor
    bbox_preds: Tensor
    hidden_states: Tensor
    references: List[Tensor]
    keep: Optional[List[Optional[Tensor]]] = None

    @property
    def num_layers(self) -> int:
        return self.cls_scores.shape[0]

    def layer_keep(self, layer: int) -> Optional[Tensor]:
        """(bs, n) bool, the queries layer ``layer`` is trained on, or
        None (all)."""
        return None if self.keep is None else self.keep[layer]

    def queries(self, index: slice) -> 'SetPredictions':
        """The predictions of queries ``index`` (along the query axis)."""
        keep = None if self.keep is None else [
            k if k is None else k[:, index] for k in self.keep
        ]
        return SetPredictions(self.cls_scores[:, :,
                                              index], self.bbox_preds[:, :,
                                                                      index],
                              self.hidden_states[:, :, index],
                              [r[:, index] for r in self.references], keep)


class QueryDetector(Protocol):
    """What a branch may use of its detector."""
    bbox_head: nn.Module  # its assigner, losses and per-layer predictors
    num_queries: int  # N, the main set's size

    def select_proposals(self,
                         enc_class: Tensor,
                         enc_coord_unact: Tensor,
                         enc_score: Optional[Tensor] = None):
        """The main queries' selection among proposals: reference boxes
        (bs, N, 4) before the sigmoid and the inputs of
        :meth:`encoder_loss`."""

    def encoder_loss(self, enc_cls: Tensor, enc_coord: Tensor,
                     batch_gt_instances, batch_img_metas) -> dict:
        """The detector's loss of selected proposals (DINO: one-to-one
        with classes; Deformable DETR: class-agnostic over all tokens)."""

    def encoder_gt_instances(self, batch_gt_instances) -> list:
        """The ground truth its encoder proposals are trained on (DINO:
        as it is; Deformable DETR: one class)."""


class QueryBranch(BaseModule):
    """Base of every branch; each hook below has its default.

    Attributes:
        name (str): unique in a detector; the prefix of the branch's loss
            keys and the name of its :class:`QuerySet`.
        uses_encoder_pyramid (bool): the detector fills
            ``QueryContext.encoder_pyramid`` (Co-DETR's auxiliary heads).
        belongs_to_main (bool): the branch's losses (of its queries and of
            :meth:`supervise_main`) are scaled with the main queries' by
            ``main_loss_weight`` (DINO's denoising).
        main_loss_weight (float): multiplies the losses of the main queries
            (decoder, encoder) and of the branches that belong to them
            (Group DETR: 1 / K).
        takes_dn_cfg (bool): the detector passes its ``dn_cfg`` as this
            branch's ``dn_cfg`` (Group DETR's per-group denoising).
        checkpoint_converter (callable | None): a ``load_state_dict``
            pre-hook the detector registers (once, however many branches
            name it) to read checkpoints of the method's official layout
            (Co-DETR's).
        replaces_main_loss (bool): :meth:`supervise_main` returns the main
            queries' decoder loss *instead of* the detector's one-to-one
            loss (Align-DETR's one-to-k layers); one branch at most.
    """
    name: str = ''
    uses_encoder_pyramid: bool = False
    belongs_to_main: bool = False
    main_loss_weight: float = 1.0
    takes_dn_cfg: bool = False
    checkpoint_converter = None
    replaces_main_loss: bool = False

    def content_tables(self) -> List[Tensor]:
        """Content tables the detector initialises like its main content
        queries (H-DETR, Group DETR); none by default."""
        return []

    def make_queries(self, main: QuerySet, context: QueryContext,
                     detector: QueryDetector,
                     batch_data_samples) -> Optional[QuerySet]:
        """This branch's decoder queries, or None (the default: a branch
        that only supervises the main queries adds none).

        Args:
            main (QuerySet): the main queries (bs, N, ...).
            context (QueryContext): the encoder outputs and proposals.
            detector (QueryDetector): proposal selection, encoder loss, head.
            batch_data_samples (list[DetDataSample]): the batch.
        """
        return None

    def loss(self, detector: QueryDetector, predictions: SetPredictions,
             queries: QuerySet, batch_data_samples) -> dict:
        """Losses of this branch's own queries (called only when
        :meth:`make_queries` returned some); keys start with its name."""
        return {}

    def supervise_main(self, detector: QueryDetector,
                       predictions: SetPredictions,
                       batch_data_samples) -> dict:
        """Loss terms this branch adds on the *main* queries (every decoder
        layer: ``predictions.cls_scores[layer]`` ...), beside their
        one-to-one loss; none by default.  Keys start with its name.
        With ``replaces_main_loss``: the main queries' whole decoder loss,
        named as the detector's (``loss_cls``, ``d0.loss_cls``, ...)."""
        return {}

    def supervise_encoder(self, detector: QueryDetector, enc_cls: Tensor,
                          enc_coord: Tensor,
                          batch_data_samples) -> Optional[dict]:
        """The encoder proposals' loss instead of the detector's
        (``enc_loss_cls``, ...), or None (the default: the detector's).

        Args:
            enc_cls (Tensor): (bs, k, num_classes) logits of the proposals
                the detector's encoder loss covers.
            enc_coord (Tensor): (bs, k, 4) their boxes in [0, 1].
        """
        return None
