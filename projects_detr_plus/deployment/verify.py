"""Compare an exported model's detections with PyTorch's ``predict``.

A DETR's top-k over (query, class) scores orders near-equal scores by
rounding: ONNX Runtime and PyTorch differ by ~1e-6, so two detections whose
scores are that close may come out swapped, and at the K-th row one may be
replaced by its tie.  :func:`match_detections` therefore matches detections
as sets: every PyTorch detection must have an exported one with the same
label, a score within ``score_atol`` and a box within the box tolerance, one
to one; only PyTorch detections tied (within ``score_atol``) with the lowest
score of a full list of K may go unmatched.
"""
from typing import Dict

import numpy as np

__all__ = ['match_detections']


def match_detections(dets,
                     labels,
                     ref_bboxes,
                     ref_scores,
                     ref_labels,
                     score_atol: float = 1e-4,
                     box_atol: float = 1e-2,
                     box_rtol: float = 0.0) -> Dict:
    """Match one image's exported detections with PyTorch's.

    Args:
        dets (ndarray): (K, 5) exported rows, x1 y1 x2 y2 score.
        labels (ndarray): (K,) exported labels, -1 for empty rows.
        ref_bboxes (ndarray): (n, 4) PyTorch ``pred_instances.bboxes``.
        ref_scores (ndarray): (n,) PyTorch scores.
        ref_labels (ndarray): (n,) PyTorch labels.
        score_atol (float): score tolerance.
        box_atol (float): box tolerance, in pixels.
        box_rtol (float): box tolerance relative to the PyTorch box's
            largest absolute coordinate; a box's tolerance is the larger of
            the two (float32 noise grows with the coordinate, and untrained
            or unclipped boxes may lie far outside the image).

    Returns:
        dict: ``ok`` (bool), ``problems`` (list of str), ``matched``,
        ``max_score_diff`` and ``max_box_diff`` over the matched pairs.
    """
    dets, labels = np.asarray(dets, np.float64), np.asarray(labels)
    ref_bboxes = np.asarray(ref_bboxes, np.float64).reshape(-1, 4)
    ref_scores = np.asarray(ref_scores, np.float64).reshape(-1)
    ref_labels = np.asarray(ref_labels).reshape(-1)
    valid = labels >= 0
    boxes, scores, classes = dets[valid, :4], dets[valid, 4], labels[valid]
    problems = []
    if len(scores) != len(ref_scores):
        problems.append(f'{len(scores)} detections, PyTorch has '
                        f'{len(ref_scores)}')
    if np.any(dets[~valid] != 0):
        problems.append('empty rows (label -1) are not all zeros')
    if len(scores) == len(ref_scores) and len(scores):
        gap = np.abs(np.sort(scores) - np.sort(ref_scores)).max()
        if gap > score_atol:
            problems.append(f'sorted scores differ by {gap:.3g}')
    full = len(ref_scores) == len(labels)
    lowest = ref_scores.min() if len(ref_scores) else 0.0
    used = np.zeros(len(scores), bool)
    score_diffs, box_diffs = [0.0], [0.0]
    box_tols = np.maximum(box_atol,
                          box_rtol * np.abs(ref_bboxes).max(-1, initial=0))
    for j in np.argsort(-ref_scores, kind='stable'):
        box_gap = np.abs(boxes - ref_bboxes[j]).max(-1) if len(boxes) else \
            np.zeros(0)
        fits = (~used & (classes == ref_labels[j]) &
                (np.abs(scores - ref_scores[j]) <= score_atol) &
                (box_gap <= box_tols[j]))
        if fits.any():
            i = np.flatnonzero(fits)[np.argmin(box_gap[fits])]
            used[i] = True
            score_diffs.append(abs(scores[i] - ref_scores[j]))
            box_diffs.append(box_gap[i])
        elif not (full and ref_scores[j] <= lowest + score_atol):
            problems.append(f'no match for PyTorch detection {j} (label '
                            f'{ref_labels[j]}, score {ref_scores[j]:.6f}, box '
                            f'{np.round(ref_bboxes[j], 3).tolist()})')
    return dict(
        ok=not problems,
        problems=problems,
        matched=int(used.sum()),
        max_score_diff=float(max(score_diffs)),
        max_box_diff=float(max(box_diffs)))
