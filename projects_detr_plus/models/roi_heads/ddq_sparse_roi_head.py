"""Sparse R-CNN's RoI head for DDQ R-CNN's distinct-query proposals.

Two things are new against mmdet's ``SparseRoIHead``:

- proposals may be padding (``valid`` False, zero boxes and features, as
  the released DDQ R-CNN pads images with fewer distinct queries): they are
  trained like the released code trains them, but at test a padded batch
  runs image by image on the real proposals, so padding never becomes a
  prediction and never changes one (the released code lets it into the
  stages' self-attention);
- ``query_roi_fusion`` (the paper's query distinctness enhancement, not in
  the released code): before the first stage each proposal feature is
  concatenated with its RoI feature averaged to 1x1 and mapped back to the
  query width by a linear layer.

mmcv's RoIAlign has no bf16 kernel: under bf16 autocast (CPU ``--amp``) the
head runs in fp32 (:func:`~projects_detr_plus.utils.amp.fp32_for_mmcv`).
"""
import torch
import torch.nn as nn
from mmdet.models.roi_heads import SparseRoIHead
from mmdet.models.utils import empty_instances
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmengine.structures import InstanceData

from ...utils.amp import fp32_for_mmcv
from ..top_k import top_class_pairs


@MODELS.register_module()
class DDQSparseRoIHead(SparseRoIHead):
    """``SparseRoIHead`` taking DDQ's distinct queries as proposals.

    Args:
        query_roi_fusion (bool): the paper's query distinctness
            enhancement (default off: the released recipe).
        *args, **kwargs: as ``SparseRoIHead``.
    """

    def __init__(self, *args, query_roi_fusion=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.query_fusion = None
        if query_roi_fusion:
            width = self.proposal_feature_channel
            self.query_fusion = nn.Linear(2 * width, width)

    def loss(self, x, rpn_results_list, batch_data_samples):
        """As ``SparseRoIHead.loss``; proposals (N, ) ``valid`` are ignored
        (padding is trained as background, as released)."""
        with fp32_for_mmcv(x) as x:
            return super().loss(x, self._proposals(x, rpn_results_list),
                                batch_data_samples)

    def _proposals(self, x, rpn_results_list):
        """The proposals as the stages take them: features (N, C) in the
        pyramid's dtype and, with ``query_roi_fusion``, fused with their
        RoI features."""
        proposals = []
        for res in rpn_results_list:
            res = res.clone()
            res.features = res.features.to(x[0].dtype)
            proposals.append(res)
        if self.query_fusion is None:
            return proposals
        extractor = self.bbox_roi_extractor[0]
        rois = bbox2roi([res.bboxes for res in proposals])
        pooled = extractor(x[:extractor.num_inputs], rois).mean((2, 3))
        for image, res in enumerate(proposals):
            res.features = self.query_fusion(
                torch.cat([res.features, pooled[rois[:, 0] == image]], dim=-1))
        return proposals

    def forward(self, x, rpn_results_list, batch_data_samples):
        """As ``SparseRoIHead.forward`` (the tensors, e.g. for
        ``get_flops``), with the fusion when enabled."""
        with fp32_for_mmcv(x) as x:
            return super().forward(x, self._proposals(x, rpn_results_list),
                                   batch_data_samples)

    def predict_bbox(self,
                     x,
                     batch_img_metas,
                     rpn_results_list,
                     rcnn_test_cfg,
                     rescale=False):
        """As ``SparseRoIHead.predict_bbox`` (the top ``max_per_img``
        (proposal, class) pairs of the last stage), without the padding:
        when the batch is padded, each image runs alone on its real
        proposals, so padding neither becomes a prediction nor enters the
        stages' self-attention (an image predicts the same in any batch)."""
        with fp32_for_mmcv(x) as x:
            return self._predict_unpadded(x, batch_img_metas,
                                          self._proposals(x, rpn_results_list),
                                          rescale)

    def _predict_unpadded(self, x, batch_img_metas, rpn_results_list, rescale):
        """:meth:`predict_bbox` on the proposals as the stages take them."""
        if all(len(res) == 0 for res in rpn_results_list):
            return empty_instances(
                batch_img_metas, x[0].device, task_type='bbox')
        if all(
                bool(res.valid.all()) for res in rpn_results_list
                if 'valid' in res):
            return self._predict_images(x, batch_img_metas, rpn_results_list,
                                        rescale)
        results = []
        for image, (res,
                    meta) in enumerate(zip(rpn_results_list, batch_img_metas)):
            real = res[res.valid] if 'valid' in res else res
            if len(real) == 0:
                results += empty_instances([meta],
                                           x[0].device,
                                           task_type='bbox')
                continue
            results += self._predict_images(
                tuple(level[image:image + 1] for level in x), [meta], [real],
                rescale)
        return results

    def _predict_images(self, x, batch_img_metas, proposals, rescale):
        """The stages on a batch with the same number of proposals per
        image; the detections of each image."""
        boxes = [res.bboxes for res in proposals]
        object_feats = torch.stack([res.features for res in proposals])
        for stage in range(self.num_stages):
            results = self._bbox_forward(stage, x, bbox2roi(boxes),
                                         object_feats, batch_img_metas)
            object_feats = results['object_feats']
            boxes = results['detached_proposals']
        scores = results['cls_score']  # (B, N, C) logits
        if self.bbox_head[-1].loss_cls.use_sigmoid:
            scores = scores.sigmoid()
        else:
            scores = scores.softmax(-1)[..., :-1]
        return [
            self._top_pairs(scores[i], boxes[i], meta, rescale)
            for i, meta in enumerate(batch_img_metas)
        ]

    def _top_pairs(self, scores, boxes, img_meta, rescale):
        """scores (N, C), boxes (N, 4) -> the image's detections."""
        top_scores, query, labels = top_class_pairs(scores,
                                                    self.test_cfg.max_per_img)
        boxes = boxes[query]
        if rescale and len(boxes):
            boxes = boxes / boxes.new_tensor(
                img_meta['scale_factor']).repeat(2)
        return InstanceData(bboxes=boxes, scores=top_scores, labels=labels)
