"""Faster R-CNN (RPN + RoI head) as a Co-DETR auxiliary head."""
import copy

import torch
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.registry import MODELS
from mmengine.config import ConfigDict
from mmengine.model import BaseModule
from mmengine.structures import InstanceData

from ...utils.amp import fp32_for_mmcv


@MODELS.register_module()
class CoStandardRoIHead(StandardRoIHead):
    """mmdet's ``StandardRoIHead`` whose loss also returns the sampled
    proposals (they become decoder queries)."""

    def loss_and_samples(self, x, rpn_results_list, batch_data_samples):
        """As ``StandardRoIHead.loss`` (boxes only), plus the samples.

        Returns:
            tuple: losses, per image the sampled proposals with their
            assigned targets (``SamplingResult``) and their RoI features
            averaged over the bins, (num_sampled, dim).
        """
        samples = []
        for feats_index, (proposals, data_sample) in enumerate(
                zip(rpn_results_list, batch_data_samples)):
            proposals = InstanceData(priors=proposals.bboxes)
            assign = self.bbox_assigner.assign(proposals,
                                               data_sample.gt_instances)
            samples.append(
                self.bbox_sampler.sample(
                    assign,
                    proposals,
                    data_sample.gt_instances,
                    feats=[lvl[feats_index][None] for lvl in x]))
        results = self.bbox_loss(x, samples)
        mean_feats = results['bbox_feats'].mean((-2, -1))
        return results['loss_bbox'], samples, mean_feats.split(
            [len(s.priors) for s in samples])


@MODELS.register_module()
class CoRCNNHead(BaseModule):
    """RPN proposals, then a RoI head, trained on the encoder pyramid.

    Args:
        rpn_head (dict): an mmdet ``RPNHead`` config.
        roi_head (dict): a :class:`CoStandardRoIHead` config.
        train_cfg (dict): ``rpn``, ``rpn_proposal`` and ``rcnn`` as in
            mmdet's Faster R-CNN ``train_cfg``.
        num_classes (int, optional): set on the RoI box head.
    """

    def __init__(self, rpn_head, roi_head, train_cfg, num_classes=None):
        super().__init__()
        train_cfg = ConfigDict(train_cfg)  # mmdet's heads read attributes
        rpn_head = dict(
            rpn_head,
            train_cfg=train_cfg['rpn'],
            test_cfg=train_cfg['rpn_proposal'])
        roi_head = copy.deepcopy(dict(roi_head, train_cfg=train_cfg['rcnn']))
        if num_classes is not None:
            roi_head['bbox_head']['num_classes'] = num_classes
        self.rpn_head = MODELS.build(rpn_head)
        self.roi_head = MODELS.build(roi_head)
        self.proposal_cfg = train_cfg['rpn_proposal']
        self.num_classes = self.roi_head.bbox_head.num_classes

    def loss_and_candidates(self, feats, batch_data_samples, with_feats=False):
        """RPN and RoI losses and, per image, the sampled proposals (the
        official Co-DETR's candidates: positives first, then negatives).

        Runs in fp32 where bf16 would reach mmcv's NMS and RoIAlign (CPU
        ``--amp``, see :func:`~projects_detr_plus.utils.amp.fp32_for_mmcv`);
        under fp16 autocast on a GPU it stays mixed precision.
        """
        with fp32_for_mmcv(feats) as feats:
            losses, candidates = self._loss_and_candidates(
                feats, batch_data_samples)
        if not with_feats:
            for c in candidates:
                del c.feats
        return losses, candidates

    def _loss_and_candidates(self, feats, batch_data_samples):
        rpn_samples = copy.deepcopy(batch_data_samples)
        for sample in rpn_samples:  # the RPN is class-agnostic
            sample.gt_instances.labels = \
                sample.gt_instances.labels.new_zeros(
                    len(sample.gt_instances))
        rpn_losses, proposals = self.rpn_head.loss_and_predict(
            feats, rpn_samples, proposal_cfg=self.proposal_cfg)
        roi_feats = feats[:self.roi_head.bbox_roi_extractor.num_inputs]
        for proposal in proposals:
            proposal.bboxes = proposal.bboxes.detach()
        roi_losses, samples, feats = self.roi_head.loss_and_samples(
            roi_feats, proposals, batch_data_samples)
        return dict(**rpn_losses, **roi_losses), [
            self._sampled(s, f) for s, f in zip(samples, feats)
        ]

    def _sampled(self, sample, feats):
        """A ``SamplingResult`` and its (n, dim) RoI features as
        candidates; negatives get label ``num_classes`` and their own box
        as target."""
        negatives = sample.pos_gt_labels.new_full((len(sample.neg_priors), ),
                                                  self.num_classes)
        labels = torch.cat([sample.pos_gt_labels, negatives])
        bboxes = torch.cat([sample.pos_gt_bboxes, sample.neg_priors])
        return InstanceData(
            priors=sample.priors.detach(),
            bboxes=bboxes.detach(),
            labels=labels,
            feats=feats)
