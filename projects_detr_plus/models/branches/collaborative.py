"""Co-DETR's collaborative hybrid assignment as a query branch.

Co-DETR (Zong et al., 2023) trains auxiliary one-to-many heads (ATSS, FCOS,
Faster R-CNN) on the encoder output, which gives the encoder many more
positives than one-to-one matching does, and turns each head's positive
anchors / proposals into *customized positive queries*: decoded by the
shared decoder, each with the target its head assigned (no matching).  At
inference the heads and queries are gone: a plain DINO, no NMS.

This branch holds one auxiliary head (:mod:`..aux_heads`).  In training:

1. the encoder memory is cut back into per-level maps and one more level is
   added by a stride-2 conv + GroupNorm (as the official model), the
   pyramid the head trains on;
2. the head's losses (their weights, lambda_2 times the number of decoder
   layers in the official configs, are in the head's config) and its
   positives are computed;
3. up to ``max_queries`` positives per image (a random subset beyond that)
   become queries: reference = the positive's box, detached; content = a
   linear map + LayerNorm of its sine embedding; images are padded to the
   batch's largest count with zero-weight queries that no query attends
   to;
4. the queries see only each other (masked from the main queries both
   ways) and are trained with the head's targets, weight ``loss_weight``
   (lambda_1 = 1).
"""
import torch
from mmdet.models.layers.transformer.utils import (coordinate_to_encoding,
                                                   inverse_sigmoid)
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from mmengine.model import BaseModule
from torch import nn

from .base import BranchQueries, fixed_target_loss


def encoder_pyramid(memory, spatial_shapes, extra_level):
    """Encoder memory (bs, sum(h*w), dim) as per-level (bs, dim, h, w)
    maps, plus ``extra_level`` applied to the last one."""
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    levels = [
        level.transpose(1, 2).reshape(memory.shape[0], -1, int(h), int(w))
        for level, (h, w) in zip(memory.split(sizes, dim=1), spatial_shapes)
    ]
    return tuple(levels + [extra_level(levels[-1])])


def _check_num_classes(aux_head, num_classes, name):
    """The auxiliary head takes the detector's ``num_classes``; a config
    that sets another one somewhere gets an error naming every place."""
    places = {f'{name}.aux_head.num_classes': aux_head.get('num_classes')}
    box_head = (aux_head.get('roi_head') or {}).get('bbox_head') or {}
    places[f'{name}.aux_head.roi_head.bbox_head.num_classes'] = \
        box_head.get('num_classes')
    wrong = {k: v for k, v in places.items()
             if v is not None and v != num_classes}
    if wrong:
        raise ValueError(
            f'num_classes is inconsistent: bbox_head.num_classes='
            f'{num_classes}, but ' + ', '.join(
                f'{k}={v}' for k, v in wrong.items()) +
            '. Set it once, in bbox_head; the query branches and their '
            'auxiliary heads take it from there.')


@MODELS.register_module()
class CollaborativeBranch(BaseModule):
    """An auxiliary one-to-many head and its customized positive queries.

    Args:
        aux_head (dict): a head from :mod:`..aux_heads` (``num_classes``
            is filled in).
        name (str): branch name and loss-key prefix, e.g. ``'co_atss'``.
        max_queries (int): most positive queries per image (300).
        loss_weight (float): weight of the positive queries' losses.
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector.
    """

    def __init__(self, aux_head, num_classes, embed_dims,
                 num_matching_queries, name='co', max_queries=300,
                 loss_weight=1.0):
        super().__init__()
        self.name = name
        self.max_queries = max_queries
        self.loss_weight = loss_weight
        _check_num_classes(aux_head, num_classes, name)
        self.aux_head = MODELS.build(dict(aux_head, num_classes=num_classes))
        self.extra_level = nn.Sequential(
            nn.Conv2d(embed_dims, embed_dims, 3, stride=2, padding=1),
            nn.GroupNorm(32, embed_dims))
        self.content = nn.Sequential(nn.Linear(embed_dims * 2, embed_dims),
                                     nn.LayerNorm(embed_dims))
        self.embed_dims = embed_dims

    def make_queries(self, main, batch_data_samples, memory=None,
                     spatial_shapes=None, **encoder_outputs):
        """Train the auxiliary head; its positives as queries.

        Returns:
            BranchQueries: (bs, P, dim) queries on the positives' boxes,
            P = the most positives of an image (at most ``max_queries``);
            ``meta`` holds the targets and the head's losses.
        """
        feats = encoder_pyramid(memory, spatial_shapes, self.extra_level)
        aux_losses, positives = self.aux_head.loss_and_positives(
            feats, batch_data_samples)
        positives = [self._bounded(p) for p in positives]
        metas = [s.metainfo for s in batch_data_samples]
        priors, targets, labels, weights = self._padded(positives, metas,
                                                        memory)
        sine = coordinate_to_encoding(priors, num_feats=self.embed_dims // 2)
        return BranchQueries(
            self.name, self.content(sine), inverse_sigmoid(priors, eps=1e-3),
            padding=weights == 0,
            meta=dict(labels=labels, bbox_targets=targets, weights=weights,
                      aux_losses=aux_losses))

    def _bounded(self, positives):
        if len(positives) <= self.max_queries:
            return positives
        keep = torch.randperm(len(positives), device=positives.labels.device)
        return positives[keep[:self.max_queries].sort().values]

    @staticmethod
    def _padded(positives, metas, like):
        """Normalised cxcywh priors and targets, labels and weights, (bs, P,
        ...), padded with zero-weight entries."""
        count = max(len(p) for p in positives)
        bs = len(positives)
        priors = like.new_full((bs, count, 4), 0.5)
        targets = like.new_full((bs, count, 4), 0.5)
        labels = torch.zeros(bs, count, dtype=torch.long, device=like.device)
        weights = like.new_zeros(bs, count)
        for i, (pos, meta) in enumerate(zip(positives, metas)):
            h, w = meta['img_shape'][:2]
            scale = like.new_tensor([w, h, w, h])
            n = len(pos)
            priors[i, :n] = (bbox_xyxy_to_cxcywh(pos.priors) / scale).clamp(
                1e-3, 1 - 1e-3)
            targets[i, :n] = bbox_xyxy_to_cxcywh(pos.bboxes) / scale
            labels[i, :n] = pos.labels
            weights[i, :n] = 1.0
        return priors.detach(), targets.detach(), labels, weights

    def loss(self, head, cls_scores, bbox_preds, queries, batch_data_samples):
        """The head's losses plus the positive queries' fixed-target loss."""
        meta = queries.meta
        losses = {f'{self.name}.{key}': value
                  for key, value in meta['aux_losses'].items()}
        # computed even without queries: its normaliser is a collective
        losses.update(fixed_target_loss(
            head, f'{self.name}_', cls_scores, bbox_preds, meta['labels'],
            meta['bbox_targets'], meta['weights'],
            [s.metainfo for s in batch_data_samples], self.loss_weight))
        if queries.num_queries == 0:  # keep the content map in the graph
            key = f'{self.name}_loss_cls'
            losses[key] = losses[key] + sum(
                p.sum() for p in self.content.parameters()) * 0.0
        return losses
