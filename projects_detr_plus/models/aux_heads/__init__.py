"""Co-DETR's auxiliary one-to-many heads on the encoder's feature pyramid.

Each head is an mmdet head, subclassed, with one more method::

    loss_and_candidates(feats, batch_data_samples, with_feats=False)
        -> (losses, candidates)

``feats``: the encoder output as a pyramid (tuple of (bs, dim, h, w));
``candidates``: per image an ``InstanceData`` of every anchor / sampled
proposal / point the head trained on: ``priors`` (A, 4) in absolute xyxy,
``labels`` (A, ), ``num_classes`` for a negative, and the targets
``bboxes`` (A, 4) absolute xyxy (meaningful for positives only), and,
``with_feats``, ``feats`` (A, dim): the pyramid's feature at an anchor's /
point's location, or a proposal's RoI feature averaged over its bins.  The
collaborative branch turns the positives into customized positive queries
and pads them with negatives, as the official Co-DETR does.
"""
from .atss import CoATSSHead
from .fcos import CoFCOSHead
from .rcnn import CoRCNNHead

__all__ = ['CoATSSHead', 'CoFCOSHead', 'CoRCNNHead']
