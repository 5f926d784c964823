"""DDQ-DETR's dense one-to-many branch.

DDQ (Zhang et al., 2023) trains, next to the distinct (NMS-selected) main
queries, a dense set of queries one-to-many: each ground truth is matched
to ``num_pos`` of them (mmdet's ``TopkHungarianAssigner``: Hungarian against
the ground truth repeated ``num_pos`` times) and trained with quality focal
loss and GIoU (mmdet's ``DDQAuxLoss``), which gives the shared decoder many
more positives.

The set: the ``ratio`` x N encoder tokens that score highest under the
head's dense encoder predictor (``cls_branches[-1]``/``reg_branches[-1]``
of :class:`~..heads.DDQHeadPlus`), no NMS; content = the detector's map of
the token (``token_content``, shared with the main queries), anchor = the
predicted box, detached.  The queries see only each other, are refined and
predicted by the head's ``aux_*_branches``, and the encoder proposals they
come from get the same one-to-many loss.  Dropped at inference.

Its loss is mmdet's ``DDQAuxLoss`` (alignment-metric targets, its own
normalisers) with mmdet's ``TopkHungarianAssigner``, kept as mmdet has them
so that DDQ-DETR trains as mmdet's (the parity suite compares every loss);
mmdet's assigner scores classification on probabilities where the released
DDQ code uses logits (:class:`~..task_modules.TopkHungarianAssignerPlus`,
which DDQ FCN / R-CNN use).
"""
import torch
from mmdet.models.losses import DDQAuxLoss
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy

from ..losses.set_losses import image_factors, layer_loss_dict
from .protocol import QueryBranch
from .queries import QuerySet


@MODELS.register_module()
class DenseQueryBranch(QueryBranch):
    """Dense queries on the top encoder tokens, matched one-to-many.

    Args:
        ratio (float): the set has ``int(ratio * N)`` queries (1.5).
        num_pos (int): predictions matched to each ground truth (4).
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector; ``num_matching_queries`` is the main set's N.
    """
    name = 'dense'

    def __init__(self,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 ratio=1.5,
                 num_pos=4):
        super().__init__()
        self.num_queries = int(num_matching_queries * ratio)
        if self.num_queries < 1:
            raise ValueError(f'DenseQueryBranch: ratio={ratio} gives no '
                             'queries')
        self.one_to_many_loss = DDQAuxLoss(
            train_cfg=dict(
                assigner=dict(type='TopkHungarianAssigner', topk=num_pos),
                alpha=1,
                beta=6))

    def make_queries(self, main, context, detector, batch_data_samples):
        """Queries on the encoder tokens the dense predictor ranks highest:
        ``context.enc_memory`` (bs, K, dim) scored by the head's dense
        encoder predictors, content ``context.token_content``."""
        head, token_content = detector.bbox_head, context.token_content
        if not hasattr(head, 'aux_reg_branches') or token_content is None:
            raise TypeError('DenseQueryBranch needs a DDQ detector and head '
                            '(DDQDETRPlus with DDQHeadPlus)')
        enc_class = head.cls_branches[-1](context.enc_memory)
        enc_coord = head.reg_branches[-1](context.enc_memory) + \
            context.enc_anchors
        count = min(self.num_queries, enc_class.shape[1])
        ranked = enc_class.max(-1)[0].topk(count, dim=1).indices

        def take(x):
            return torch.gather(x, 1, ranked[...,
                                             None].expand(-1, -1, x.shape[-1]))

        coord = take(enc_coord)
        return QuerySet(
            self.name,
            take(token_content),
            coord.detach(),
            predictors=(head.aux_cls_branches, head.aux_reg_branches),
            meta=dict(enc_class=take(enc_class), enc_coord=coord.sigmoid()))

    def loss(self, detector, predictions, queries, batch_data_samples):
        """One-to-many loss of every decoder layer and of the proposals
        ((num_layers, bs, n, ...) predictions).

        Returns:
            dict: ``dense_loss_cls`` (quality focal) and ``dense_loss_iou``
            (GIoU) per layer (``d{i}.`` prefix but for the last) and
            ``dense_enc_loss_cls`` / ``dense_enc_loss_iou``.
        """
        per_layer = dict(loss_cls=[], loss_iou=[])
        for layer_cls, layer_bbox in zip(predictions.cls_scores,
                                         predictions.bbox_preds):
            loss_cls, loss_iou = self._one_to_many(layer_cls, layer_bbox,
                                                   batch_data_samples)
            per_layer['loss_cls'].append(loss_cls)
            per_layer['loss_iou'].append(loss_iou)
        losses = layer_loss_dict(f'{self.name}_', per_layer)
        enc_cls, enc_iou = self._one_to_many(queries.meta['enc_class'],
                                             queries.meta['enc_coord'],
                                             batch_data_samples)
        losses[f'{self.name}_enc_loss_cls'] = enc_cls
        losses[f'{self.name}_enc_loss_iou'] = enc_iou
        return losses

    def _one_to_many(self, logits, boxes, batch_data_samples):
        """(classification, GIoU) loss of (bs, n, C) logits and (bs, n, 4)
        normalised cxcywh boxes."""
        metas = [s.metainfo for s in batch_data_samples]
        pixel_boxes = bbox_cxcywh_to_xyxy(boxes) * image_factors(
            list(boxes), metas).view_as(boxes)
        gts = [s.gt_instances for s in batch_data_samples]
        losses = self.one_to_many_loss.loss(logits.sigmoid(), pixel_boxes,
                                            [gt.bboxes for gt in gts],
                                            [gt.labels for gt in gts], metas)
        return sum(losses['aux_loss_cls']), sum(losses['aux_loss_bbox'])
