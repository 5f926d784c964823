"""DDQ R-CNN's proposal stage: the DDQ FCN head whose top distinct queries
become Sparse R-CNN's proposals.

As the released code (``jshilong/DDQ``, ``projects/models/ddq_fcn_rpn.py``):
the FCN head keeps its two losses (with the object classes: DDQ's proposal
stage is a detector, not a class-agnostic RPN); its ``num_distinct_queries``
best distinct queries per image give the proposal boxes (detached) and the
proposal features, ``Linear(2 * feat_channels -> feat_channels)`` of the
towers' last classification and regression features at the query's point
(detached).  Images with fewer distinct queries than the batch's largest
count are padded with zero boxes and features, as the released code pads;
``valid`` marks the real ones, so the RoI head can keep the padding out of
its predictions.
"""
import torch
import torch.nn as nn
from mmdet.registry import MODELS
from mmengine.structures import InstanceData

from .ddq_fcn_head import DDQFCNHead


@MODELS.register_module()
class DDQFCNRPNHead(DDQFCNHead):
    """:class:`DDQFCNHead` as Sparse R-CNN's proposal generator.

    ``loss_and_predict`` / ``predict`` return per image an ``InstanceData``
    with ``bboxes`` (N, 4) absolute xyxy, ``features`` (N, feat_channels),
    ``imgs_whwh`` (N, 4) and ``valid`` (N, ) bool, N the largest number of
    distinct queries in the batch (at most ``num_distinct_queries``), as
    mmdet's ``EmbeddingRPNHead`` returns them for ``SparseRoIHead``.
    """

    def _init_layers(self):
        super()._init_layers()
        self.compress = nn.Linear(self.feat_channels * 2, self.feat_channels)

    def loss_and_predict(self, x, batch_data_samples, proposal_cfg=None):
        """The FCN losses and the proposals, from one forward pass and one
        distinct-query selection.  ``batch_data_samples`` keep their real
        labels."""
        scores, distances, aux_scores, aux_distances, cls_feats, reg_feats = \
            self(x)
        queries = self.distinct_queries(scores, distances)
        metas = [s.metainfo for s in batch_data_samples]
        losses = self.loss_of_queries(
            queries, aux_scores, aux_distances,
            [s.gt_instances for s in batch_data_samples], metas)
        losses['num_distinct'] = scores[0].new_tensor(
            sum(len(q) for q in queries) / len(queries))
        return losses, self.proposals(queries, cls_feats, reg_feats, metas)

    def predict(self, x, batch_data_samples, rescale=False):
        """The proposals (``rescale`` is ignored: the RoI head works in the
        network's input frame)."""
        scores, distances, _, _, cls_feats, reg_feats = self(x)
        queries = self.distinct_queries(scores, distances)
        return self.proposals(queries, cls_feats, reg_feats,
                              [s.metainfo for s in batch_data_samples])

    def proposals(self, queries, cls_feats, reg_feats, batch_img_metas):
        """Proposals from the distinct ``queries`` (as
        :meth:`distinct_queries`); ``cls_feats`` / ``reg_feats`` per level
        (B, feat_channels, H_l, W_l)."""
        point_feats = self.point_features(cls_feats, reg_feats)
        kept = [q[:self.num_distinct_queries] for q in queries]
        size = max(len(q) for q in kept)
        proposals = []
        for image, (q, meta) in enumerate(zip(kept, batch_img_metas)):
            h, w = meta['img_shape'][:2]
            feats = self.compress(point_feats[image, q.point_ids])
            valid = torch.arange(size, device=feats.device) < len(q)
            proposals.append(
                InstanceData(
                    bboxes=_pad(q.bboxes.detach(), size),
                    features=_pad(feats, size),
                    imgs_whwh=feats.new_tensor([w, h, w, h]).repeat(size, 1),
                    valid=valid))
        return proposals

    def point_features(self, cls_feats, reg_feats):
        """(B, all points, 2 * feat_channels), detached: the towers' last
        classification and regression features (per level (B,
        feat_channels, H_l, W_l)) at every point, in ``point_ids`` order;
        :attr:`compress` maps a query's row to its proposal feature."""
        return torch.cat(
            [points_of(cls_feats), points_of(reg_feats)], dim=-1).detach()


def points_of(feats):
    """Per-level (B, C, H_l, W_l) maps -> (B, all points, C), level by
    level, row-major (the order of ``point_ids``)."""
    return torch.cat([f.flatten(2) for f in feats], dim=2).transpose(1, 2)


def _pad(x, size):
    """x (n, D) with zero rows appended up to ``size``."""
    return torch.cat([x, x.new_zeros(size - len(x), *x.shape[1:])])
