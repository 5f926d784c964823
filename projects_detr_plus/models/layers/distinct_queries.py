"""DDQ's distinct query selection: class-agnostic NMS over query boxes,
expressed as the main queries' self-attention mask.

DDQ (Zhang et al., 2023) keeps queries dense (for recall) but distinct
(duplicates weaken one-to-one matching): before the decoder, NMS over the
encoder proposals picks the main queries; after every decoder layer but the
last, NMS over the refined boxes of the queries still distinct suppresses
the new duplicates, which the next layer masks out of self-attention and
whose predictions neither the loss nor inference uses.  The NMS itself is
the op :func:`~projects_detr_plus.ops.nms.distinct_mask`.
"""
from dataclasses import replace

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy

from ...ops.nms import distinct_mask
from .attention_layout import AttentionBlock

SUPPRESSED_MODES = ('isolated', 'mmdet')


def check_suppressed_mode(mode):
    """``mode`` if it is one of :data:`SUPPRESSED_MODES`, else ValueError."""
    if mode not in SUPPRESSED_MODES:
        raise ValueError(f'suppressed_queries must be one of '
                         f'{SUPPRESSED_MODES}, got {mode!r}')
    return mode


class DistinctQuerySelection:
    """Distinct-query selection between decoder layers, for one forward pass.

    Pass it as the decoder's ``between_layers``.  After layer ``l`` it
    scores the main queries (the first ``num_main`` of the decoder) with the
    head's layer-``l`` classifier, runs NMS over the refined boxes of those
    still distinct, appends their (bs, num_main) bool mask to ``keeps`` (the
    queries whose predictions count in the loss of layer ``l + 1`` and, for
    the last, at inference) and returns the next layer's self-attention
    layout, with the main attention block masked per image.  A new object
    per forward pass: nothing outlives it.

    Args:
        cls_branches (nn.ModuleList): the head's per-layer classifiers.
        num_main (int): number of main queries.
        nms_cfg (dict): e.g. ``dict(type='nms', iou_threshold=0.8)``.
        suppressed (str): ``'isolated'``: a suppressed query neither attends
            nor is attended to (it sees itself only), as if removed;
            ``'mmdet'``: exactly what mmdet 3.3's DDQ does, for its
            checkpoints.  Its mask lets distinct queries still attend to
            suppressed ones, suppressed ones attend to distinct ones only,
            and denoising queries see all main queries.  And mmdet reads the
            distinct set back from the *first row* of that mask, which is
            all queries whenever query 0 is distinct: then every query
            counts in the loss, at inference and in the next NMS.
    """

    def __init__(self, cls_branches, num_main, nms_cfg, suppressed='isolated'):
        self.cls_branches = cls_branches
        self.num_main = num_main
        self.nms_cfg = nms_cfg
        self.suppressed = check_suppressed_mode(suppressed)
        self.keeps = []
        self._first_mask = None

    def __call__(self, layer_id, query, reference_points, layout):
        """Select after layer ``layer_id``; returns the next layout.

        Args:
            query (Tensor): the layer's output, (bs, N, dim).
            reference_points (Tensor): refined boxes (bs, N, 4), cxcywh in
                [0, 1].
            layout: the layer's self-attention layout (``concat_query_sets``).
        """
        n = self.num_main
        scores = self.cls_branches[layer_id](query[:, :n]).sigmoid()
        boxes = bbox_cxcywh_to_xyxy(reference_points[:, :n])
        previous = self.keeps[-1] if self.keeps else None
        keep = distinct_mask(boxes,
                             scores.max(-1).values, self.nms_cfg, previous)
        # mmdet: row 0 of its visibility mask, keep[i] or keep[0]
        self.keeps.append(keep | keep[:, :1] if self.suppressed ==
                          'mmdet' else keep)
        return self._layout(layout, keep)

    def _layout(self, layout, keep):
        """``layout`` with the main block masked per image by ``keep``."""
        if layout is None:  # the main queries alone, unmasked
            layout = [AttentionBlock(0, 1, self.num_main)]
        block = layout[0]
        if self._first_mask is None:
            self._first_mask = block.mask  # (S, S) or None: static
        bs, n, size = keep.shape[0], self.num_main, block.group_size
        mask = keep.new_zeros(size, size) if self._first_mask is None \
            else self._first_mask
        mask = mask.expand(bs, size, size).clone()
        if self.suppressed == 'mmdet':
            mask[:, :n, :n] = ~(keep[:, :, None] | keep[:, None, :])
        else:
            eye = torch.eye(n, dtype=torch.bool, device=keep.device)
            mask[:, :n, :n] = ~(keep[:, :, None] & keep[:, None, :] | eye)
            mask[:, n:, :n] |= ~keep[:, None, :]
        return [replace(block, mask=mask)] + list(layout[1:])
