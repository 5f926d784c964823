"""MS-DETR's one-to-many supervision of the main queries (impl. (a)).

MS-DETR (Zhao et al., CVPR 2024, arXiv 2401.03989, "Efficient DETR
Training with Mixed Supervision") adds to the one-to-one loss a
one-to-many (o2m) loss of the *same* queries on every decoder layer: no
extra queries, inference unchanged.  Official: Atten4Vis/MS-DETR
``impl_a/models/deformable_detr.py`` (122-125, 198-221, 449-481, 642-665),
``impl_a/models/matcher_o2m.py``: each layer's hidden states get their own
class head (``class_embed_o2m``), the box heads are shared (the o2m boxes
*are* the main ``bbox_preds``: reused), pairs come from
:class:`~..task_modules.o2m_assigner.MSDETRAssigner`, losses are focal /
L1 / GIoU over the number of ground truths, weights 2 / 5 / 2.  A query in
several pairs has a box loss per pair and the class of its best one (the
official ``target_classes[idx] =`` keeps the last of the ascending order).
``encoder_loss_weights`` rescales the encoder terms to the recipes'
``--enc_*_loss_coef`` (2 / 5 / 2 beside ``--cls_loss_coef 1``).

Not here: the top-level code's variant (c) (``--use_aux_ffn``, as in the
50.0 AP ``scripts/train_ms_detr_pp_900.sh``) runs cross- before
self-attention in every decoder layer (inference changes) and supervises an
auxiliary FFN after the cross-attention.  Deliberate differences: the
encoder is matched as the detector's (the official criterion, baselines
included, matches it on the anchors with no class cost; the encoder hook
gets no anchors); the o2m heads are initialised like the head's, not copied
from it; ``predictions.keep`` (DDQ) is honoured.  The assigner draws
``torch.randperm`` twice per layer and image, the last layer first as the
official loop: deterministic under ``torch.manual_seed``, but the global
generator is shifted for whatever draws after the loss.
"""
import copy

import torch
from mmdet.models.utils import multi_apply
from mmdet.registry import MODELS, TASK_UTILS
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from mmengine.model import bias_init_with_prob
from torch import nn

from ..losses.set_losses import (collate_targets, layer_loss_dict, per_image,
                                 set_loss)
from ..task_modules.o2m_assigner import MSDETRAssigner  # noqa: F401
from .protocol import QueryBranch

ENCODER_KEYS = ('enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou')


@MODELS.register_module()
class MSDETRBranch(QueryBranch):
    """The o2m loss of every decoder layer's main queries.

    Args:
        num_layers (int): decoder layers (one class head each; checked).
        assigner (dict): ``TASK_UTILS`` config of the pairs.
        loss_cls, loss_bbox, loss_iou (dict): the o2m losses.
        encoder_loss_weights (tuple[float] | None): the encoder's cls, L1,
            IoU weights instead of the head's; None: the detector's loss.
        num_classes, embed_dims, num_matching_queries: from the detector.
    """
    name = 'o2m'
    sync_cls_avg_factor = True  # the official num_boxes: mean over ranks

    def __init__(self,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 num_layers=6,
                 assigner=dict(type='MSDETRAssigner'),
                 loss_cls=dict(
                     type='FocalLoss',
                     use_sigmoid=True,
                     gamma=2.0,
                     alpha=0.25,
                     loss_weight=2.0),
                 loss_bbox=dict(type='L1Loss', loss_weight=5.0),
                 loss_iou=dict(type='GIoULoss', loss_weight=2.0),
                 encoder_loss_weights=None):
        super().__init__()
        self.num_classes = num_classes
        fc_cls = nn.Linear(embed_dims, num_classes)
        nn.init.constant_(fc_cls.bias, bias_init_with_prob(0.01))
        self.cls_branches = nn.ModuleList(
            copy.deepcopy(fc_cls) for _ in range(num_layers))
        self.assigner = TASK_UTILS.build(assigner)
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_iou = MODELS.build(loss_iou)
        self.encoder_loss_weights = encoder_loss_weights

    def supervise_main(self, detector, predictions, batch_data_samples):
        num_layers, heads = len(predictions.hidden_states), len(
            self.cls_branches)
        if num_layers != heads:
            raise ValueError(f'{self.name}: num_layers={heads} but the '
                             f'decoder has {num_layers} layers')
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        per_layer = {
            key: [None] * num_layers
            for key in ('loss_cls', 'loss_bbox', 'loss_iou')
        }
        # the official order (its random draws): the last layer first
        for layer in [num_layers - 1, *range(num_layers - 1)]:
            losses = self.layer_loss(
                self.cls_branches[layer](predictions.hidden_states[layer]),
                predictions.bbox_preds[layer], gts, metas,
                predictions.layer_keep(layer))
            for key, loss in zip(per_layer, losses):
                per_layer[key][layer] = loss
        return layer_loss_dict(f'{self.name}_', per_layer)

    def layer_loss(self, cls_scores, bbox_preds, gts, metas, keep=None):
        """Losses of one layer's (bs, n, C) logits and (bs, n, 4) boxes
        (the rows ``keep`` (bs, n) keeps), over the number of ground
        truths."""
        cls_list = per_image(cls_scores, keep)
        box_list = per_image(bbox_preds, keep)
        per_img, rows = multi_apply(self._image_targets, cls_list, box_list,
                                    gts, metas)
        targets = collate_targets(per_img, rows, metas)
        targets.num_pos = targets.cls_avg_factor = float(
            sum(len(gt) for gt in gts))
        flat_cls = torch.cat([c[r] for c, r in zip(cls_list, rows)])
        flat_box = torch.cat([b[r] for b, r in zip(box_list, rows)])
        return set_loss(self, flat_cls, flat_box, targets)

    def _image_targets(self, cls_scores, bbox_preds, gt, meta):
        """One image's targets over its n queries' rows plus one row per
        further pair of a query matched more than once (a box loss, no
        classification)."""
        img_h, img_w = meta['img_shape'][:2]
        factor = bbox_preds.new_tensor([img_w, img_h, img_w, img_h])
        gt_boxes = bbox_xyxy_to_cxcywh(gt.bboxes / factor)
        query, gt_ind = self.assigner.assign(cls_scores, bbox_preds, gt_boxes,
                                             gt.labels)
        n, pairs = len(cls_scores), torch.arange(
            len(query), device=query.device)
        last = query.new_full((n, ),
                              -1).scatter_reduce(0, query, pairs, 'amax')
        best = last[query] == pairs  # each query's pair giving its class
        rows = torch.cat([torch.arange(n, device=query.device), query[~best]])
        slot = query.clone()  # the row of each pair
        slot[~best] = torch.arange(n, len(rows), device=query.device)
        labels = query.new_full((len(rows), ), self.num_classes)
        labels[query[best]] = gt.labels[gt_ind[best]]
        label_weights = gt_boxes.new_zeros(len(rows)).index_fill(
            0, torch.arange(n, device=query.device), 1.0)
        bbox_targets = gt_boxes.new_zeros(len(rows), 4).index_copy(
            0, slot, gt_boxes[gt_ind])
        bbox_weights = gt_boxes.new_zeros(len(rows),
                                          1).index_fill(0, slot,
                                                        1.0).expand(-1, 4)
        return (labels, label_weights, bbox_targets, bbox_weights, len(query),
                n - int(best.sum())), rows

    def supervise_encoder(self, detector, enc_cls, enc_coord,
                          batch_data_samples):
        if self.encoder_loss_weights is None:
            return None
        losses = detector.encoder_loss(
            enc_cls, enc_coord, [s.gt_instances for s in batch_data_samples],
            [s.metainfo for s in batch_data_samples])
        head = detector.bbox_head
        own = (head.loss_cls, head.loss_bbox, head.loss_iou)
        return {
            key: losses[key] * (weight / loss.loss_weight)
            for key, weight, loss in zip(ENCODER_KEYS,
                                         self.encoder_loss_weights, own)
        }
