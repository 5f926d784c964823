"""DDQ FCN: mmdet's one-stage detector with :class:`~..heads.DDQFCNHead`.

Nothing else is new: the head makes its dense queries distinct and returns
NMS-free predictions, so the stock ``SingleStageDetector`` runs it (the
released code, ``jshilong/DDQ`` ``projects/configs/ddq_fcn``, uses it as
is).  The class gives the method its own registered name.
"""
from mmdet.models.detectors import SingleStageDetector
from mmdet.registry import MODELS


@MODELS.register_module()
class DDQFCN(SingleStageDetector):
    """``SingleStageDetector`` whose ``bbox_head`` is a ``DDQFCNHead``."""
