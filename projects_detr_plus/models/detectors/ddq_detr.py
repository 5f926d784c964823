"""DDQ-DETR on the query-branch architecture.

What DDQ adds to :class:`DINOPlus` (Zhang et al., 2023, "Dense Distinct
Queries"):

* **distinct main queries**: class-agnostic NMS (IoU 0.8) over all encoder
  proposals, then the top N; their content is a linear map of their encoder
  token (``query_map``) instead of learnt embeddings;
* **distinct queries before each decoder layer**:
  :class:`~..layers.distinct_queries.DistinctQuerySelection` masks the
  suppressed ones out of self-attention; the loss of layer ``l`` and the
  predictions use only the queries distinct at its input;
* **a dense one-to-many branch** (:class:`~..branches.DenseQueryBranch`),
  built from ``dense_topk_ratio`` and the head's ``aux_num_pos``.

Same parameters and state-dict keys as mmdet's ``DDQDETR`` (with
:class:`~..heads.DDQHeadPlus`), but no ``cache_dict``: the selection is a
per-forward object and its masks are returned by :meth:`forward_decoder`.
"""
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.models.detectors import DeformableDETR
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from torch import nn

from ...ops.nms import distinct_mask
from ..branches import MAIN, DenseQueryBranch, QuerySet
from ..layers.distinct_queries import (DistinctQuerySelection,
                                       check_suppressed_mode)
from ..top_k import gather_rows, top_kept
from .dino import DINOPlus


@MODELS.register_module()
class DDQDETRPlus(DINOPlus):
    """DINO with dense distinct queries and a dense one-to-many branch.

    Args:
        dense_topk_ratio (float): dense queries per main query (1.5).
        dqs_cfg (dict): NMS of the distinct query selection.
        suppressed_queries (str): how suppressed queries take part in
            self-attention: ``'isolated'`` (not at all) or ``'mmdet'``
            (mmdet's mask; use it with mmdet checkpoints).  See
            :class:`DistinctQuerySelection`.
        *args, **kwargs: as :class:`DINOPlus`; ``bbox_head`` must be a
            :class:`DDQHeadPlus`.
    """

    def __init__(self,
                 *args,
                 dense_topk_ratio=1.5,
                 dqs_cfg=dict(type='nms', iou_threshold=0.8),
                 suppressed_queries='isolated',
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.bbox_head, 'aux_num_pos'):
            raise TypeError('DDQDETRPlus needs bbox_head=DDQHeadPlus, got '
                            f'{type(self.bbox_head).__name__}')
        self.dqs_cfg = dict(dqs_cfg)
        self.suppressed_queries = check_suppressed_mode(suppressed_queries)
        self.extra_branches.append(
            DenseQueryBranch(**self._branch_args(
                dict(
                    ratio=dense_topk_ratio,
                    num_pos=self.bbox_head.aux_num_pos))))
        self._check_branch_names()
        self.register_load_state_dict_pre_hook(_drop_mmdet_decoder_alias)

    def _init_layers(self):
        super()._init_layers()
        self.query_embedding = None  # content comes from query_map
        self.query_map = nn.Linear(self.embed_dims, self.embed_dims)

    def init_weights(self):
        """As mmdet's DDQDETR (DINO's, without query embeddings)."""
        super(DeformableDETR, self).init_weights()
        for coder in self.encoder, self.decoder:
            for p in coder.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.xavier_uniform_(self.memory_trans_fc.weight)
        nn.init.normal_(self.level_embed)
        self.init_branch_contents()

    def query_context(self, memory, memory_mask, spatial_shapes):
        """DINO's, plus ``token_content`` (bs, num_keys, dim): the content
        query every encoder token would give."""
        context = super().query_context(memory, memory_mask, spatial_shapes)
        context.token_content = self.query_map(memory.detach())
        return context

    def main_queries(self, context):
        """The top N of the encoder proposals that survive NMS.

        Images with fewer survivors are padded with zero queries, as mmdet
        does.  Fixed shapes throughout (the NMS op's mask, then
        :func:`~..top_k.top_kept`), so that export traces this very code.

        Returns:
            tuple: the main :class:`QuerySet` (reference detached),
            their class logits (bs, N, C) and boxes (bs, N, 4) in [0, 1]
            (undetached, for the encoder loss).
        """
        enc_class, enc_coord_unact = context.enc_class, context.enc_coord_unact
        boxes = bbox_cxcywh_to_xyxy(enc_coord_unact.sigmoid())
        scores = enc_class.max(-1)[0].sigmoid()
        keep = distinct_mask(boxes, scores, self.dqs_cfg)
        index, valid = top_kept(keep, scores, self.num_queries)

        def take(x):
            return gather_rows(x, index, valid)

        coords_unact = take(enc_coord_unact)
        main = QuerySet(MAIN, take(context.token_content),
                        coords_unact.detach())
        return main, take(enc_class), coords_unact.sigmoid()

    def forward_decoder(self, query_sets=None, **decoder_inputs):
        """DINO's decoder with distinct query selection between layers.

        Returns:
            dict: ``hidden_states``, ``references`` and ``query_keep``: the
            (bs, N) bool masks of the main queries distinct at the input of
            decoder layers 1, 2, ...
        """
        selection = DistinctQuerySelection(self.bbox_head.cls_branches,
                                           query_sets[0].num_queries,
                                           self.dqs_cfg,
                                           self.suppressed_queries)
        outputs = super().forward_decoder(
            query_sets=query_sets, between_layers=selection, **decoder_inputs)
        outputs['query_keep'] = selection.keeps
        return outputs

    def main_keep(self, decoder_outputs):
        """Layer 0 is trained on every main query, layer l on those
        distinct at its input (``query_keep`` of :meth:`forward_decoder`)."""
        return [None] + list(decoder_outputs.get('query_keep', ()))


def _drop_mmdet_decoder_alias(module, state_dict, prefix, *args):
    """mmdet's DDQDETR registers ``bbox_head.aux_reg_branches`` a second
    time, as ``decoder.aux_reg_branches``, on its first training step, so
    its trained checkpoints hold those weights twice: drop the copy."""
    alias = f'{prefix}decoder.aux_reg_branches.'
    for key in [k for k in state_dict if k.startswith(alias)]:
        del state_dict[key]
