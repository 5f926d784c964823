"""The distinct-query NMS op (``projects_detr_plus.ops.nms``): its eager
kernel against the index function DDQ runs, and its ONNX lowering
(``NonMaxSuppression`` + ``ScatterND``, run in ONNX Runtime) against the
eager kernel, on random boxes, ties and empty inputs.

The ONNX half needs the deploy extra (onnx, onnxruntime, onnxscript): it
skips without it, or fails in CI (``DETR_PLUS_REQUIRE_EXT=1``).
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from projects_detr_plus.ops.nms import (distinct_indices, distinct_mask,
                                        exportable_iou_threshold, nms_keep,
                                        nms_translation_table)

NMS = dict(type='nms', iou_threshold=0.5)


def random_boxes(bs, n, seed):
    """(bs, n, 4) xyxy boxes in [0, 1] that often overlap, distinct
    (bs, n) scores and (bs, n) candidates (80 %)."""
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(bs, n, 2, generator=gen) * 0.7
    wh = torch.rand(bs, n, 2, generator=gen) * 0.3 + 0.05
    scores = torch.rand(bs, n, generator=gen)
    candidates = torch.rand(bs, n, generator=gen) > 0.2
    return torch.cat([xy, xy + wh], -1), scores, candidates


def tied_boxes():
    """Two images of 18 boxes, every score 0.5: image 0 holds 18 disjoint
    boxes (all kept, whatever the order ties are visited in), image 1 nine
    disjoint boxes, each twice (one of each pair kept)."""
    cells = torch.arange(9.)
    grid = torch.stack([cells % 3 * 2, cells // 3 * 2], -1)  # 2 apart
    disjoint = torch.cat([grid, grid + torch.tensor([7., 0.])])
    boxes = torch.stack([disjoint, torch.cat([grid, grid])])
    boxes = torch.cat([boxes, boxes + 1], -1)  # unit boxes
    return boxes, torch.full((2, 18), 0.5), torch.ones(2, 18, dtype=torch.bool)


def as_mask(indices, like):
    mask = torch.zeros_like(like, dtype=torch.bool)
    for image, kept in enumerate(indices):
        mask[image, kept] = True
    return mask


# --------------------------------------------------------------------------
# the eager kernel
# --------------------------------------------------------------------------
@pytest.mark.parametrize('seed', [0, 1])
def test_nms_keep_is_the_mask_of_distinct_indices(seed):
    boxes, scores, candidates = random_boxes(3, 60, seed)
    keep = nms_keep(boxes, scores, 0.5, candidates)
    kept = distinct_indices(boxes, scores, NMS, candidates)
    for image, indices in enumerate(kept):
        assert keep[image].nonzero().flatten().tolist() == \
            sorted(indices.tolist())
        # by descending score
        assert torch.all(scores[image, indices].diff() <= 0)
    assert (keep <= candidates).all() and keep.sum() < candidates.sum()
    assert torch.equal(
        nms_keep(boxes, scores, 0.5),
        as_mask(distinct_indices(boxes, scores, NMS), scores))


def test_nms_keep_on_ties_and_empty_inputs():
    boxes, scores, candidates = tied_boxes()
    keep = nms_keep(boxes, scores, 0.5, candidates)
    assert keep[0].all()
    assert keep[1].sum() == 9 and (keep[1, :9] ^ keep[1, 9:]).all()
    empty = nms_keep(torch.zeros(2, 0, 4), torch.zeros(2, 0), 0.5)
    assert empty.shape == (2, 0) and empty.dtype == torch.bool
    none = torch.zeros_like(candidates)
    assert not nms_keep(boxes, scores, 0.5, none).any()
    assert [len(k) for k in distinct_indices(boxes, scores, NMS, none)] == \
        [0, 0]


def test_nms_keep_checks_and_opcheck():
    boxes, scores, candidates = random_boxes(2, 20, seed=3)
    with pytest.raises(ValueError, match='candidates'):
        nms_keep(boxes, scores, 0.5, candidates.float())
    with pytest.raises(ValueError, match='boxes'):
        nms_keep(boxes[..., :3], scores, 0.5)
    with pytest.raises(ValueError, match='scores'):
        nms_keep(boxes, scores[:, :5], 0.5)
    torch.library.opcheck(torch.ops.detr_plus.nms_keep.default,
                          (boxes, scores, candidates, 0.5))


def test_distinct_mask_of_any_config_and_the_exportable_ones():
    boxes, scores, candidates = random_boxes(2, 40, seed=4)
    assert torch.equal(
        distinct_mask(boxes, scores, NMS, candidates),
        nms_keep(boxes, scores, 0.5, candidates))
    # a config the op cannot hold runs the index function itself
    other = dict(NMS, score_threshold=0.5)
    expected = as_mask(
        distinct_indices(boxes, scores, other, candidates), scores)
    assert torch.equal(
        distinct_mask(boxes, scores, other, candidates), expected)
    assert not (expected & (scores <= 0.5)).any()
    assert exportable_iou_threshold(dict(type='nms', iou_threshold=0.7)) \
        == 0.7
    for refused in (other, dict(type='soft_nms', iou_threshold=0.5)):
        with pytest.raises(ValueError, match='exports to ONNX'):
            exportable_iou_threshold(refused)


def test_ops_import_with_torch_alone():
    """mmcv (the kernel) and onnxscript (the lowering) load lazily."""
    code = ('import sys\n'
            "for name in ('mmcv', 'mmdet', 'onnxscript'):\n"
            '    sys.modules[name] = None\n'
            'import projects_detr_plus.ops.nms as nms\n'
            "assert hasattr(nms, 'nms_keep')\n")
    subprocess.run([sys.executable, '-c', code], check=True)


# --------------------------------------------------------------------------
# the ONNX lowering against the eager kernel
# --------------------------------------------------------------------------
@pytest.fixture(scope='module')
def exported():
    """``nms_keep`` at IoU 0.6 exported with a dynamic batch and box count,
    as an ONNX Runtime runner."""
    if not all(
            importlib.util.find_spec(name) is not None
            for name in ('onnx', 'onnxruntime', 'onnxscript')):
        reason = ('the deploy extra (onnx, onnxruntime, onnxscript) is not '
                  'installed: pip install -e ".[deploy]"')
        if os.environ.get('DETR_PLUS_REQUIRE_EXT') == '1':
            pytest.fail(reason)
        pytest.skip(reason)
    import onnxruntime as ort

    class Keep(torch.nn.Module):

        def forward(self, boxes, scores, candidates):
            return nms_keep(boxes, scores, 0.6, candidates)

    dim = torch.export.Dim
    axes = {0: dim('bs'), 1: dim('n')}
    program = torch.onnx.export(
        Keep(),
        random_boxes(2, 40, seed=1),
        dynamo=True,
        dynamic_shapes=(axes, axes, axes),
        custom_translation_table=nms_translation_table(),
        verbose=False)
    ops_used = {n.op_type for n in program.model_proto.graph.node}
    assert 'NonMaxSuppression' in ops_used
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    names = [i.name for i in session.get_inputs()]

    def run(*args):
        return session.run(None, {
            name: arg.numpy()
            for name, arg in zip(names, args)
        })[0]

    return Keep(), run


@pytest.mark.parametrize('bs,n,seed', [(2, 40, 10), (3, 75, 11), (1, 5, 12),
                                       (4, 200, 13)])
def test_onnx_lowering_equals_eager_kernel(exported, bs, n, seed):
    eager, run = exported
    args = random_boxes(bs, n, seed)
    np.testing.assert_array_equal(run(*args), eager(*args).numpy())


def test_onnx_lowering_on_ties_and_empty_inputs(exported):
    eager, run = exported
    boxes, scores, candidates = tied_boxes()
    keep = run(boxes, scores, candidates)
    # which box of a tied pair survives is the runtime's choice
    np.testing.assert_array_equal(keep[0],
                                  eager(boxes, scores, candidates)[0].numpy())
    assert keep[1].sum() == 9 and (keep[1, :9] ^ keep[1, 9:]).all()
    none = torch.zeros_like(candidates)
    assert not run(boxes, scores, none).any()
    empty = (torch.zeros(2, 0, 4), torch.zeros(2, 0),
             torch.zeros(2, 0, dtype=torch.bool))
    assert run(*empty).shape == (2, 0)
