"""DDQ FCN: one query per feature point of a light conv head, made distinct
by class-agnostic NMS, trained one-to-one; its output needs no NMS.

As the released code (``jshilong/DDQ``, ``projects/models/ddq_fcn_head.py``):
two 4-conv GN towers over P3-P7 whose last convs exchange channels with the
adjacent levels ("pyramid shuffle"); score ``sqrt(sigmoid(cls) *
sigmoid(objectness))``; ``exp`` ltrb distances in strides.  Candidates = per
level the top ``nms_pre`` points by their best class score; distinct queries
= the candidates kept by class-agnostic NMS (IoU 0.7), in training and at
test.  Losses: one-to-one (top-1 Hungarian, QFL with an IoU-quality target,
GIoU) on every distinct query, and a training-only one-to-many branch
(separate last convs on the same towers, top-8 Hungarian, no NMS).  Test:
the top ``num_distinct_queries`` (query, class) pairs.

Shapes: B images, C classes, per level (H_l, W_l); ``n`` candidates per
image (sum over levels of min(nms_pre, H_l W_l)).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, Scale
from mmdet.models.dense_heads import AnchorFreeHead
from mmdet.models.utils import sigmoid_geometric_mean
from mmdet.registry import MODELS
from mmdet.structures.bbox import distance2bbox
from mmengine.model import bias_init_with_prob, normal_init
from mmengine.structures import InstanceData

from ...ops.nms import distinct_indices
from ..losses.ddq_aux_loss import DDQAuxLossPlus
from ..top_k import gather_rows, top_class_pairs


def _one_to_k_loss(topk):
    """The released DDQ FCN loss config (``DDQFCNHead`` defaults)."""
    return dict(
        loss_cls=dict(
            type='QualityFocalLoss',
            use_sigmoid=True,
            activated=True,
            beta=2.0,
            loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        train_cfg=dict(
            assigner=dict(type='TopkHungarianAssignerPlus', topk=topk),
            alpha=1,
            beta=6))


def pyramid_shuffle(feats, num_channels):
    """Exchange channels with the adjacent pyramid levels.

    Level ``l`` keeps its first ``C - 2 * num_channels`` channels and takes
    the last ``num_channels`` of level ``l + 1`` and the middle
    ``num_channels`` (after its kept ones) of level ``l - 1``, both resized
    bilinearly to its size (the top and bottom levels use themselves).

    Args:
        feats (list[Tensor]): per level (B, C, H_l, W_l).
    Returns:
        list[Tensor]: same shapes.
    """
    keep = feats[0].shape[1] - 2 * num_channels
    last = len(feats) - 1
    shuffled = []
    for level, feat in enumerate(feats):
        size = feat.shape[-2:]
        upper = feats[min(level + 1, last)][:, keep + num_channels:]
        lower = feats[max(level - 1, 0)][:, keep:keep + num_channels]
        shuffled.append(
            torch.cat([
                feat[:, :keep],
                F.interpolate(
                    upper, size=size, mode='bilinear', align_corners=True),
                F.interpolate(
                    lower, size=size, mode='bilinear', align_corners=True)
            ],
                      dim=1))
    return shuffled


@MODELS.register_module()
class DDQFCNHead(AnchorFreeHead):
    """The DDQ FCN head (see the module docstring).

    Args:
        num_classes (int), in_channels (int): as ``AnchorFreeHead``.
        strides (tuple[int]): P3-P7.
        dqs_cfg (dict): the distinct-query NMS, mmcv's ``batched_nms``
            config plus ``nms_pre`` (candidates per level), as the official
            config writes it.
        num_distinct_queries (int): predictions per image at test.
        shuffle_channels (int): channels exchanged per neighbour.
        shuffled_cls_convs / shuffled_reg_convs (int, optional): how many of
            the last convs of each tower shuffle; None: as released,
            ``stacked_convs - 2`` and ``stacked_convs - 3``.
        main_loss / aux_loss (dict): mmdet ``DDQAuxLoss`` configs of the
            one-to-one and one-to-many losses.
        positives_near_centre (int, optional): the seed's option: only the
            k points nearest each object's centre on each level may be its
            one-to-one positive (the paper: 9); None (released code): any.
        **kwargs: as ``AnchorFreeHead`` (``feat_channels``,
            ``stacked_convs``, ``norm_cfg``...).
    """

    def __init__(self,
                 num_classes,
                 in_channels,
                 strides=(8, 16, 32, 64, 128),
                 dqs_cfg=dict(type='nms', iou_threshold=0.7, nms_pre=1000),
                 num_distinct_queries=300,
                 shuffle_channels=64,
                 shuffled_cls_convs=None,
                 shuffled_reg_convs=None,
                 main_loss=_one_to_k_loss(1),
                 aux_loss=_one_to_k_loss(8),
                 positives_near_centre=None,
                 **kwargs):
        dqs_cfg = dict(dqs_cfg)
        self.nms_pre = dqs_cfg.pop('nms_pre', 1000)
        self.dqs_cfg = dqs_cfg
        self.num_distinct_queries = num_distinct_queries
        self.shuffle_channels = shuffle_channels
        self.positives_near_centre = positives_near_centre
        super().__init__(num_classes, in_channels, strides=strides, **kwargs)
        self.shuffled_cls_convs = max(0, self.stacked_convs - 2) \
            if shuffled_cls_convs is None else shuffled_cls_convs
        self.shuffled_reg_convs = max(0, self.stacked_convs - 3) \
            if shuffled_reg_convs is None else shuffled_reg_convs
        if self.feat_channels < 2 * shuffle_channels:
            raise ValueError(f'feat_channels ({self.feat_channels}) must be '
                             f'at least 2 * shuffle_channels')
        self.main_loss = DDQAuxLossPlus(**main_loss)
        self.aux_loss = DDQAuxLossPlus(**aux_loss)

    # ------------------------------------------------------------------
    # layers
    # ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """``nn.Module``'s loading: mmdet's ``AnchorFreeHead`` renames any
        key of a state dict without version metadata (a plain dict, e.g. a
        converted checkpoint) whose first name ends in ``cls`` / ``reg`` to
        ``conv_cls`` / ``conv_reg`` (for FCOS checkpoints of 2019), which
        would load ``aux_conv_cls`` / ``aux_conv_reg`` into the main
        branch's convolutions.  This head never had those old names."""
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args,
                                        **kwargs)

    def _init_layers(self):
        self.cls_convs = self._tower()
        self.reg_convs = self._tower()
        self.objectness, self.conv_cls, self.conv_reg = self._predictors()
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        (self.aux_conv_objectness, self.aux_conv_cls,
         self.aux_conv_reg) = self._predictors()
        self.aux_scales = nn.ModuleList(Scale(1.0) for _ in self.strides)

    def _tower(self):
        return nn.ModuleList(
            ConvModule(
                self.in_channels if i == 0 else self.feat_channels,
                self.feat_channels,
                3,
                padding=1,
                conv_cfg=self.conv_cfg,
                norm_cfg=self.norm_cfg) for i in range(self.stacked_convs))

    def _predictors(self):
        width = self.feat_channels
        objectness = nn.Sequential(
            nn.Conv2d(width, width // 4, 1), nn.ReLU(inplace=True),
            nn.Conv2d(width // 4, 1, 3, padding=1))
        return (objectness, nn.Conv2d(width, self.num_classes, 3, padding=1),
                nn.Conv2d(width, 4, 3, padding=1))

    def init_weights(self):
        """The released initialisation: N(0, 0.01) convs, prior-0.01 class
        biases (and auxiliary objectness bias), zero main objectness bias;
        like the released head it replaces ``init_cfg`` (the auxiliary
        objectness' first conv keeps PyTorch's default)."""
        for tower in (self.cls_convs, self.reg_convs):
            for m in tower.modules():
                if isinstance(m, nn.Conv2d):
                    normal_init(m, std=0.01)
        for m in self.objectness.modules():
            if isinstance(m, nn.Conv2d):
                normal_init(m, std=0.01, bias=0)
        bias_cls = bias_init_with_prob(0.01)
        for conv in (self.conv_cls, self.aux_conv_cls,
                     self.aux_conv_objectness[-1]):
            normal_init(conv, std=0.01, bias=bias_cls)
        normal_init(self.conv_reg, std=0.01)
        normal_init(self.aux_conv_reg, std=0.01)

    # ------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------
    def forward(self, feats):
        """
        Args:
            feats (tuple[Tensor]): P3-P7, each (B, in_channels, H_l, W_l).

        Returns:
            tuple: ``scores`` per level (B, C, H_l, W_l) probabilities,
            ``distances`` per level (B, 4, H_l, W_l) ltrb in strides, the
            same two of the one-to-many branch (None at inference), and the
            towers' last ``cls_feats`` and ``reg_feats`` per level.
        """
        cls_feats = self._run_tower(feats, self.cls_convs,
                                    self.shuffled_cls_convs)
        reg_feats = self._run_tower(feats, self.reg_convs,
                                    self.shuffled_reg_convs)
        scores, distances = self._predict_maps(cls_feats, reg_feats,
                                               self.conv_cls, self.objectness,
                                               self.conv_reg, self.scales)
        aux_scores = aux_distances = None
        if self.training:
            aux_scores, aux_distances = self._predict_maps(
                cls_feats, reg_feats, self.aux_conv_cls,
                self.aux_conv_objectness, self.aux_conv_reg, self.aux_scales)
        return (scores, distances, aux_scores, aux_distances, cls_feats,
                reg_feats)

    def _run_tower(self, feats, convs, num_shuffled):
        first_shuffled = len(convs) - num_shuffled
        for index, conv in enumerate(convs):
            if index >= first_shuffled:
                feats = pyramid_shuffle(feats, self.shuffle_channels)
            feats = [conv(feat) for feat in feats]
        return feats

    @staticmethod
    def _predict_maps(cls_feats, reg_feats, conv_cls, conv_objectness,
                      conv_reg, scales):
        scores, distances = [], []
        for cls_feat, reg_feat, scale in zip(cls_feats, reg_feats, scales):
            scores.append(
                sigmoid_geometric_mean(
                    conv_cls(cls_feat), conv_objectness(reg_feat)))
            distances.append(scale(conv_reg(reg_feat).exp()).float())
        return scores, distances

    # ------------------------------------------------------------------
    # dense candidates and distinct queries
    # ------------------------------------------------------------------
    def candidates(self, scores, distances):
        """Per level the top ``nms_pre`` points by best class score.

        Returns:
            tuple: ``scores`` (B, n, C), ``boxes`` (B, n, 4) absolute xyxy,
            ``point_ids`` (B, n) indices into the points of all levels
            (level by level, row-major), all with gradients where they
            have them.
        """
        sizes = [s.shape[-2:] for s in scores]
        priors = self.prior_generator.grid_priors(
            sizes, dtype=scores[0].dtype, device=scores[0].device)
        picked_scores, picked_boxes, picked_ids = [], [], []
        first_id = 0
        for level_scores, level_dists, points, stride in zip(
                scores, distances, priors, self.strides):
            level_scores = level_scores.flatten(2).transpose(1, 2)
            level_dists = level_dists.flatten(2).transpose(1, 2) * stride
            k = min(self.nms_pre, level_scores.shape[1])
            top = level_scores.max(-1).values.topk(k, dim=1).indices
            picked_scores.append(gather_rows(level_scores, top))
            picked_boxes.append(
                distance2bbox(points[top], gather_rows(level_dists, top)))
            picked_ids.append(top + first_id)
            first_id += level_scores.shape[1]
        return (torch.cat(picked_scores,
                          1), torch.cat(picked_boxes,
                                        1), torch.cat(picked_ids, 1))

    def distinct(self, scores, boxes):
        """Class-agnostic NMS per image (DDQ-DETR's selection, the op):
        list of (n_i, ) kept indices by descending best score."""
        return distinct_indices(boxes, scores.max(-1).values, self.dqs_cfg)

    def distinct_queries(self, scores, distances):
        """Candidates, then the distinct ones.

        Returns:
            list[InstanceData]: per image ``scores`` (n_i, C), ``bboxes``
            (n_i, 4) absolute xyxy, ``point_ids`` (n_i, ), by descending
            best score.
        """
        cand_scores, cand_boxes, point_ids = self.candidates(scores, distances)
        return [
            InstanceData(
                scores=cand_scores[b, keep],
                bboxes=cand_boxes[b, keep],
                point_ids=point_ids[b, keep])
            for b, keep in enumerate(self.distinct(cand_scores, cand_boxes))
        ]

    # ------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------
    def loss_by_feat(self,
                     scores,
                     distances,
                     aux_scores,
                     aux_distances,
                     cls_feats,
                     reg_feats,
                     batch_gt_instances,
                     batch_img_metas,
                     batch_gt_instances_ignore=None):
        """One-to-one loss of the distinct queries, one-to-many loss of the
        auxiliary branch's candidates (see the module docstring)."""
        queries = self.distinct_queries(scores, distances)
        return self.loss_of_queries(queries, aux_scores, aux_distances,
                                    batch_gt_instances, batch_img_metas)

    def loss_of_queries(self, queries, aux_scores, aux_distances,
                        batch_gt_instances, batch_img_metas):
        """The losses, given the distinct ``queries`` (as
        :meth:`distinct_queries`) and the auxiliary maps (as
        :meth:`forward`)."""
        gt_boxes = [gt.bboxes for gt in batch_gt_instances]
        gt_labels = [gt.labels for gt in batch_gt_instances]
        allowed = None
        if self.positives_near_centre:
            sizes = [s.shape[-2:] for s in aux_scores]
            allowed = [
                self.near_centre(sizes, boxes)[q.point_ids]
                for q, boxes in zip(queries, gt_boxes)
            ]
        main = self.main_loss.loss([q.scores for q in queries],
                                   [q.bboxes for q in queries],
                                   gt_boxes,
                                   gt_labels,
                                   batch_img_metas,
                                   allowed=allowed)
        aux_scores, aux_boxes, _ = self.candidates(aux_scores, aux_distances)
        aux = self.aux_loss.loss(
            list(aux_scores), list(aux_boxes), gt_boxes, gt_labels,
            batch_img_metas)
        return dict(
            loss_cls=sum(main['aux_loss_cls']),
            loss_bbox=sum(main['aux_loss_bbox']),
            aux_loss_cls=sum(aux['aux_loss_cls']),
            aux_loss_bbox=sum(aux['aux_loss_bbox']))

    def get_targets(self, *args, **kwargs):
        """Targets come from the Hungarian assignment inside the losses."""
        raise NotImplementedError('DDQFCNHead assigns in its losses')

    def near_centre(self, featmap_sizes, gt_boxes):
        """(points of all levels, G) bool: a point is among the
        ``positives_near_centre`` points of its level nearest gt ``j``'s
        centre (points ordered as :meth:`candidates`'s ``point_ids``)."""
        centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        masks = []
        for points in self.prior_generator.grid_priors(
                featmap_sizes, dtype=centres.dtype, device=centres.device):
            distance = torch.cdist(points, centres)
            k = min(self.positives_near_centre, len(points))
            nearest = distance.topk(k, dim=0, largest=False).indices
            masks.append(
                torch.zeros_like(distance,
                                 dtype=torch.bool).scatter_(0, nearest, True))
        return torch.cat(masks)

    # ------------------------------------------------------------------
    # predict
    # ------------------------------------------------------------------
    def predict_by_feat(self,
                        scores,
                        distances,
                        aux_scores=None,
                        aux_distances=None,
                        cls_feats=None,
                        reg_feats=None,
                        batch_img_metas=None,
                        cfg=None,
                        rescale=False,
                        with_nms=True):
        """The top ``num_distinct_queries`` (query, class) pairs of the
        distinct queries per image, boxes clipped to the image; no NMS
        (``with_nms`` is ignored: the queries are already distinct)."""
        queries = self.distinct_queries(scores, distances)
        return [
            self._top_pairs(q, meta, rescale)
            for q, meta in zip(queries, batch_img_metas)
        ]

    def _top_pairs(self, queries, img_meta, rescale):
        h, w = img_meta['img_shape'][:2]
        boxes = torch.minimum(
            queries.bboxes.clamp(min=0),
            queries.bboxes.new_tensor([w, h, w, h]))
        if rescale:
            boxes = boxes / boxes.new_tensor(
                img_meta['scale_factor']).repeat(2)
        top_scores, query, labels = top_class_pairs(queries.scores,
                                                    self.num_distinct_queries)
        return InstanceData(
            bboxes=boxes[query], scores=top_scores, labels=labels)
