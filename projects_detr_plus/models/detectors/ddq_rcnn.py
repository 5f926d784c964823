"""DDQ R-CNN: DDQ FCN's distinct queries as the proposals of 2 Sparse R-CNN
stages.

What differs from mmdet's ``SparseRCNN`` (as the released code,
``jshilong/DDQ`` ``projects/models/ddq_rcnn.py``): the proposal stage sees
the pyramid from ``rpn_start_level`` on (P3-P7; the RoI head gets P2-P7)
and trains with the real object classes (``TwoStageDetector`` builds its
RPN with ``num_classes=1`` and ``TwoStageDetector.loss`` sets every label to
0).
"""
from mmdet.models.detectors import TwoStageDetector
from mmdet.registry import MODELS


@MODELS.register_module()
class DDQRCNN(TwoStageDetector):
    """Sparse R-CNN with a ``DDQFCNRPNHead`` and a ``DDQSparseRoIHead``.

    Args:
        rpn_head (dict): the proposal stage, built with its own
            ``num_classes``.
        rpn_start_level (int): first neck output the proposal stage uses
            (1: the neck's P2-P7 minus P2).
        **kwargs: as ``TwoStageDetector`` (``backbone``, ``neck``,
            ``roi_head``, ``train_cfg``, ``test_cfg``...).
    """

    def __init__(self,
                 rpn_head,
                 rpn_start_level=1,
                 train_cfg=None,
                 test_cfg=None,
                 **kwargs):
        super().__init__(train_cfg=train_cfg, test_cfg=test_cfg, **kwargs)
        self.rpn_head = MODELS.build(
            dict(
                rpn_head,
                train_cfg=train_cfg.rpn if train_cfg else None,
                test_cfg=test_cfg.rpn if test_cfg else None))
        self.rpn_start_level = rpn_start_level

    def loss(self, batch_inputs, batch_data_samples):
        """Proposal-stage losses (``rpn_`` prefixed) and the RoI head's."""
        x = self.extract_feat(batch_inputs)
        rpn_losses, proposals = self.rpn_head.loss_and_predict(
            x[self.rpn_start_level:], batch_data_samples)
        losses = {f'rpn_{name}': value for name, value in rpn_losses.items()}
        losses.update(self.roi_head.loss(x, proposals, batch_data_samples))
        return losses

    def predict(self, batch_inputs, batch_data_samples, rescale=True):
        x = self.extract_feat(batch_inputs)
        proposals = self.rpn_head.predict(x[self.rpn_start_level:],
                                          batch_data_samples)
        results = self.roi_head.predict(
            x, proposals, batch_data_samples, rescale=rescale)
        return self.add_pred_to_datasample(batch_data_samples, results)

    def _forward(self, batch_inputs, batch_data_samples=None):
        x = self.extract_feat(batch_inputs)
        proposals = self.rpn_head.predict(x[self.rpn_start_level:],
                                          batch_data_samples)
        return self.roi_head.forward(x, proposals, batch_data_samples)
