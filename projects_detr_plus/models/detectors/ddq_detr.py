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
import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmdet.models.detectors import DeformableDETR
from mmdet.models.utils import align_tensor
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmdet.utils import reduce_mean
from torch import nn

from ..branches import MAIN, BranchQueries, DenseQueryBranch, layer_loss_dict
from ..layers.distinct_queries import (DistinctQuerySelection,
                                       check_suppressed_mode,
                                       distinct_indices)
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

    def __init__(self, *args, dense_topk_ratio=1.5,
                 dqs_cfg=dict(type='nms', iou_threshold=0.8),
                 suppressed_queries='isolated', **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.bbox_head, 'aux_num_pos'):
            raise TypeError('DDQDETRPlus needs bbox_head=DDQHeadPlus, got '
                            f'{type(self.bbox_head).__name__}')
        self.dqs_cfg = dict(dqs_cfg)
        self.suppressed_queries = check_suppressed_mode(suppressed_queries)
        self.extra_branches.append(DenseQueryBranch(**self._branch_args(dict(
            ratio=dense_topk_ratio, num_pos=self.bbox_head.aux_num_pos))))
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

    def query_inputs(self, memory, memory_mask, spatial_shapes):
        """DINO's, plus ``token_content`` (bs, num_keys, dim): the content
        query every encoder token would give."""
        inputs = super().query_inputs(memory, memory_mask, spatial_shapes)
        inputs['token_content'] = self.query_map(memory.detach())
        return inputs

    def main_queries(self, enc_class, enc_coord_unact, token_content,
                     **query_inputs):
        """The top N of the encoder proposals that survive NMS.

        Images with fewer survivors are padded with zero queries, as mmdet
        does.

        Returns:
            tuple: the main :class:`BranchQueries` (reference detached),
            their class logits (bs, N, C) and boxes (bs, N, 4) in [0, 1]
            (undetached, for the encoder loss).
        """
        boxes = bbox_cxcywh_to_xyxy(enc_coord_unact.sigmoid())
        scores = enc_class.max(-1)[0].sigmoid()
        kept = [keep[:self.num_queries] for keep in
                distinct_indices(boxes, scores, self.dqs_cfg)]

        def take(x):
            return align_tensor([x[b][keep] for b, keep in enumerate(kept)],
                                self.num_queries)

        coords_unact = take(enc_coord_unact)
        main = BranchQueries(MAIN, take(token_content), coords_unact.detach())
        return main, take(enc_class), coords_unact.sigmoid()

    def forward_decoder(self, branch_queries=None, **decoder_inputs):
        """DINO's decoder with distinct query selection between layers.

        Returns:
            dict: ``hidden_states``, ``references`` and ``query_keep``: the
            (bs, N) bool masks of the main queries distinct at the input of
            decoder layers 1, 2, ...
        """
        selection = DistinctQuerySelection(
            self.bbox_head.cls_branches, branch_queries[0].num_queries,
            self.dqs_cfg, self.suppressed_queries)
        outputs = super().forward_decoder(branch_queries=branch_queries,
                                          between_layers=selection,
                                          **decoder_inputs)
        outputs['query_keep'] = selection.keeps
        return outputs

    def main_decoder_loss(self, cls_scores, bbox_preds, batch_gt_instances,
                          batch_img_metas, query_keep=()):
        """One-to-one loss of each layer over the queries distinct at its
        input (all of them for the first layer)."""
        keeps = [None] + list(query_keep)
        per_layer = dict(loss_cls=[], loss_bbox=[], loss_iou=[])
        for layer_cls, layer_bbox, keep in zip(cls_scores, bbox_preds, keeps):
            losses = kept_query_loss(self.bbox_head, layer_cls, layer_bbox,
                                     keep, batch_gt_instances,
                                     batch_img_metas)
            for key, loss in zip(per_layer, losses):
                per_layer[key].append(loss)
        return layer_loss_dict('', per_layer)


def _drop_mmdet_decoder_alias(module, state_dict, prefix, *args):
    """mmdet's DDQDETR registers ``bbox_head.aux_reg_branches`` a second
    time, as ``decoder.aux_reg_branches``, on its first training step, so
    its trained checkpoints hold those weights twice: drop the copy."""
    alias = f'{prefix}decoder.aux_reg_branches.'
    for key in [k for k in state_dict if k.startswith(alias)]:
        del state_dict[key]


def kept_query_loss(head, cls_scores, bbox_preds, keep, batch_gt_instances,
                    batch_img_metas):
    """The head's one-to-one loss of one decoder layer over each image's
    kept queries (mmdet's ``DETRHead.loss_by_feat_single`` on a ragged
    batch).

    Args:
        head (DINOHead): assigner and losses.
        cls_scores (Tensor): (bs, n, num_classes) logits.
        bbox_preds (Tensor): (bs, n, 4), normalised cxcywh.
        keep (Tensor | None): (bs, n) bool; None: all queries.
        batch_gt_instances (list[InstanceData]), batch_img_metas (list[dict]).

    Returns:
        tuple[Tensor]: classification, L1 and IoU losses.
    """
    if keep is None:
        return head.loss_by_feat_single(cls_scores, bbox_preds,
                                        batch_gt_instances, batch_img_metas)
    cls_list = [scores[k] for scores, k in zip(cls_scores, keep)]
    bbox_list = [boxes[k] for boxes, k in zip(bbox_preds, keep)]
    (labels, label_weights, bbox_targets, bbox_weights, num_pos,
     num_neg) = head.get_targets(cls_list, bbox_list, batch_gt_instances,
                                 batch_img_metas)
    cls_avg_factor = num_pos * 1.0 + num_neg * head.bg_cls_weight
    if head.sync_cls_avg_factor:
        cls_avg_factor = reduce_mean(cls_scores.new_tensor([cls_avg_factor]))
    loss_cls = head.loss_cls(
        torch.cat(cls_list), torch.cat(labels), torch.cat(label_weights),
        avg_factor=max(cls_avg_factor, 1))
    num_pos = reduce_mean(cls_scores.new_tensor([num_pos])).clamp(min=1)
    factors = torch.cat([
        boxes.new_tensor([w, h, w, h]).expand(len(boxes), 4)
        for boxes, (h, w) in zip(
            bbox_list, (meta['img_shape'][:2] for meta in batch_img_metas))])
    boxes, targets = torch.cat(bbox_list), torch.cat(bbox_targets)
    bbox_weights = torch.cat(bbox_weights)
    loss_iou = head.loss_iou(
        bbox_cxcywh_to_xyxy(boxes) * factors,
        bbox_cxcywh_to_xyxy(targets) * factors, bbox_weights,
        avg_factor=num_pos.item())
    loss_bbox = head.loss_bbox(boxes, targets, bbox_weights,
                               avg_factor=num_pos.item())
    return loss_cls, loss_bbox, loss_iou
