"""Co-DETR's auxiliary one-to-many heads on the encoder's feature pyramid.

Each head is an mmdet head, subclassed, with one more method::

    loss_and_positives(feats, batch_data_samples) -> (losses, positives)

``feats``: the encoder output as a pyramid (tuple of (bs, dim, h, w));
``positives``: per image an ``InstanceData`` with ``priors`` (P, 4), the
positive anchors / proposals / point boxes in absolute xyxy, and their
targets ``bboxes`` (P, 4) absolute xyxy and ``labels`` (P, ).  The
collaborative branch turns them into customized positive queries.
"""
from .atss import CoATSSHead
from .fcos import CoFCOSHead
from .rcnn import CoRCNNHead

__all__ = ['CoATSSHead', 'CoFCOSHead', 'CoRCNNHead']
