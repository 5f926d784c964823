"""Test-time filtering of a DETR's predictions, as the official Co-DINO.

NMS-free DETRs predict the top ``max_per_img`` (query, class) pairs; the
official Co-DINO then applies a score threshold and soft-NMS.  Both are
options of ``test_cfg`` here, off by default (mmdet's behaviour).
"""
from mmcv.ops import batched_nms


class PredictionFilter:
    """Mixin for an mmdet detector: ``test_cfg.score_thr`` and
    ``test_cfg.nms`` applied to its ``predict``."""

    def predict(self, batch_inputs, batch_data_samples, rescale=True):
        """mmdet's predictions (the top ``max_per_img`` (query, class)
        pairs), then, as the official Co-DINO:

        * without those scoring at most ``test_cfg.score_thr`` (default 0:
          all kept, as mmdet; COCO mAP wants them all, deployment usually
          does not);
        * ``test_cfg.nms`` (default none, NMS-free): an mmcv
          ``batched_nms`` config (per class), e.g. ``dict(type='soft_nms',
          iou_threshold=0.8)``; scores become the NMS's (soft-NMS decays
          them), at most ``max_per_img`` kept.
        """
        samples = super().predict(batch_inputs, batch_data_samples, rescale)
        test_cfg = self.test_cfg or {}
        threshold = test_cfg.get('score_thr', 0.0)
        for sample in samples:
            instances = sample.pred_instances
            if threshold > 0:
                instances = instances[instances.scores > threshold]
            if test_cfg.get('nms') and len(instances):
                instances = self._nms(instances, test_cfg)
            sample.pred_instances = instances
        return samples

    @staticmethod
    def _nms(instances, test_cfg):
        """``test_cfg.nms`` on (n, ) predictions, best first."""
        dets, keep = batched_nms(instances.bboxes, instances.scores,
                                 instances.labels, dict(test_cfg['nms']))
        instances = instances[keep]
        instances.scores = dets[:, -1]
        return instances[:test_cfg.get('max_per_img', len(instances))]
