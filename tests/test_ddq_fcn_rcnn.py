"""DDQ FCN and DDQ R-CNN: distinct queries, the assigner on logits, the
seed's options (near-centre positives, flexible RoIs, query-RoI fusion),
padded proposals, empty ground truth and the shapes configs."""
import copy
import os.path as osp

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.ops import nms, roi_align
from mmdet.models.task_modules.assigners import FocalLossCost
from mmdet.structures.bbox import bbox_overlaps
from mmengine.config import Config
from mmengine.structures import InstanceData

from conftest import REPO_ROOT
from detr_testing import build, make_batch, parameters_without_grad
from projects_detr_plus.models.heads import ddq_fcn_head
from projects_detr_plus.models.heads.ddq_fcn_head import pyramid_shuffle

FCN_CFG = Config.fromfile(
    osp.join(REPO_ROOT, 'configs/shapes/ddq-fcn-tiny_shapes.py'))
RCNN_CFG = Config.fromfile(
    osp.join(REPO_ROOT, 'configs/shapes/ddq-rcnn-tiny_shapes.py'))
NUM_CLASSES = 6  # both shapes configs
IOU_THR = 0.7  # their dqs_cfg
STRIDES = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------
def fcn(**head_options):
    cfg = copy.deepcopy(FCN_CFG.model)
    cfg.bbox_head.update(head_options)
    torch.manual_seed(0)
    return build(cfg)


def rcnn(rpn_options=None, roi_options=None):
    cfg = copy.deepcopy(RCNN_CFG.model)
    cfg.rpn_head.update(rpn_options or {})
    cfg.roi_head.update(roi_options or {})
    torch.manual_seed(0)
    return build(cfg)


def enlarge_boxes(head, ltrb=(1.0, 1.0, 1.0, 1.0), std=0.05):
    """Larger, more varied regressions than at initialisation, so that the
    distinct-query NMS suppresses candidates."""
    with torch.no_grad():
        head.conv_reg.weight.normal_(std=std)
        head.conv_reg.bias.copy_(torch.tensor(ltrb))
    return head


def prep(model, inputs, samples, training):
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=copy.deepcopy(samples)), training)
    return data['inputs'], data['data_samples']


def head_outputs(head, sizes=(16, 8, 4, 2, 1), seed=1, batch=2):
    """The head's outputs on random P3-P7 maps (a 128x128 image)."""
    gen = torch.Generator().manual_seed(seed)
    feats = [
        torch.randn(batch, head.in_channels, s, s, generator=gen)
        for s in sizes
    ]
    with torch.no_grad():
        return head(feats)


def max_pairwise_iou(boxes):
    if len(boxes) < 2:
        return 0.
    iou = bbox_overlaps(boxes, boxes)
    iou.fill_diagonal_(0)
    return float(iou.max())


def rows_in(rows, table):
    """(n, ) bool: row i of ``rows`` is (exactly) one of ``table``'s."""
    return (rows[:, None, :] == table[None]).all(-1).any(1)


def loss_total(losses):
    return sum(v for k, v in losses.items() if 'loss' in k)


def hand_points(featmap_sizes):
    """The points of every level, level by level, row-major, by hand."""
    points = []
    for (h, w), stride in zip(featmap_sizes, STRIDES):
        ys, xs = torch.meshgrid(
            torch.arange(h), torch.arange(w), indexing='ij')
        points.append(
            torch.stack([(xs.flatten() + 0.5) * stride,
                         (ys.flatten() + 0.5) * stride], -1))
    return points


# ----------------------------------------------------------------------
# pyramid shuffle
# ----------------------------------------------------------------------
def test_pyramid_shuffle_takes_the_documented_channels():
    torch.manual_seed(0)
    c, s = 16, 4
    feats = [torch.randn(2, c, h, h + 1) for h in (8, 4, 2, 1)]
    out = pyramid_shuffle(feats, s)
    last = len(feats) - 1
    for level, (feat, res) in enumerate(zip(feats, out)):
        assert res.shape == feat.shape
        size = feat.shape[-2:]
        upper = feats[min(level + 1, last)][:, c - s:]
        lower = feats[max(level - 1, 0)][:, c - 2 * s:c - s]
        torch.testing.assert_close(res[:, :c - 2 * s], feat[:, :c - 2 * s])
        torch.testing.assert_close(
            res[:, c - 2 * s:c - s],
            F.interpolate(
                upper, size=size, mode='bilinear', align_corners=True))
        torch.testing.assert_close(
            res[:, c - s:],
            F.interpolate(
                lower, size=size, mode='bilinear', align_corners=True))
    # the top and bottom levels exchange with themselves
    torch.testing.assert_close(out[last][:, c - 2 * s:c - s],
                               feats[last][:, c - s:])
    torch.testing.assert_close(out[0][:, c - s:], feats[0][:, c - 2 * s:c - s])


def test_towers_shuffle_before_their_last_convs(monkeypatch):
    head = fcn().bbox_head
    calls = []
    original = ddq_fcn_head.pyramid_shuffle

    def counting(feats, num_channels):
        calls.append(num_channels)
        return original(feats, num_channels)

    monkeypatch.setattr(ddq_fcn_head, 'pyramid_shuffle', counting)
    head.eval()
    head_outputs(head)
    assert calls == [32] * (head.shuffled_cls_convs + head.shuffled_reg_convs)
    assert (head.shuffled_cls_convs, head.shuffled_reg_convs) == (2, 1)


# ----------------------------------------------------------------------
# candidates and distinct queries
# ----------------------------------------------------------------------
def test_candidate_point_ids_are_level_by_level_row_major():
    head = fcn().bbox_head
    sizes = [(6, 5), (3, 3), (2, 1), (1, 2), (1, 1)]  # not square
    scores = [torch.rand(2, NUM_CLASSES, h, w) for h, w in sizes]
    distances = [torch.ones(2, 4, h, w) for h, w in sizes]
    cand_scores, boxes, ids = head.candidates(scores, distances)
    points = torch.cat(hand_points(sizes))
    total = sum(h * w for h, w in sizes)
    assert cand_scores.shape == (2, total, NUM_CLASSES)
    for b in range(2):
        assert sorted(ids[b].tolist()) == list(range(total))
        centres = (boxes[b, :, :2] + boxes[b, :, 2:]) / 2
        torch.testing.assert_close(centres, points[ids[b]])
        flat = torch.cat([s[b].flatten(1).t() for s in scores])
        torch.testing.assert_close(cand_scores[b], flat[ids[b]])


def _clustered_boxes(gen, num_clusters=4, per_cluster=6):
    """Non-negative boxes in tight clusters (IoU within a cluster > 0.7)
    plus a few isolated ones."""
    boxes = []
    for _ in range(num_clusters):
        xy = torch.rand(2, generator=gen) * 80
        wh = torch.rand(2, generator=gen) * 30 + 20
        base = torch.cat([xy, xy + wh])
        boxes.append(base + torch.rand(per_cluster, 4, generator=gen))
    xy = torch.rand(5, 2, generator=gen) * 100
    boxes.append(torch.cat([xy, xy + 4], 1))
    return torch.cat(boxes)


def test_distinct_on_heavily_overlapping_boxes_is_per_image_nms():
    head = fcn().bbox_head
    gen = torch.Generator().manual_seed(0)
    boxes = torch.stack([_clustered_boxes(gen), _clustered_boxes(gen)])
    scores = torch.rand(2, boxes.shape[1], NUM_CLASSES, generator=gen)
    kept = head.distinct(scores, boxes)
    for b, keep in enumerate(kept):
        best = scores[b].max(-1).values
        # NMS must remove most of each cluster
        assert 4 + 5 <= len(keep) < boxes.shape[1]
        assert max_pairwise_iou(boxes[b, keep]) <= IOU_THR
        # by descending best score, equal to mmcv's NMS of this image alone
        assert torch.all(best[keep][:-1] >= best[keep][1:])
        _, ref = nms(boxes[b], best, IOU_THR)
        assert torch.equal(keep, ref)
        # every suppressed box overlaps a better kept box
        dropped = torch.ones(boxes.shape[1], dtype=torch.bool)
        dropped[keep] = False
        iou = bbox_overlaps(boxes[b, dropped], boxes[b, keep])
        better = best[keep][None] >= best[dropped][:, None]
        assert ((iou > IOU_THR) & better).any(1).all()


@pytest.mark.parametrize('ltrb', [(0., 0., 0., 0.), (1., 1., 1., 1.),
                                  (2., 2., 2., 2.)])
def test_distinct_queries_equal_per_image_nms_of_the_candidates(ltrb):
    head = enlarge_boxes(fcn().bbox_head, ltrb)
    head.eval()
    scores, distances = head_outputs(head)[:2]
    cand_scores, cand_boxes, ids = head.candidates(scores, distances)
    queries = head.distinct_queries(scores, distances)
    suppressed = 0
    for b, q in enumerate(queries):
        best = cand_scores[b].max(-1).values
        _, keep = nms(cand_boxes[b], best, IOU_THR)
        assert torch.equal(q.point_ids, ids[b, keep])
        torch.testing.assert_close(q.bboxes, cand_boxes[b, keep])
        torch.testing.assert_close(q.scores, cand_scores[b, keep])
        assert max_pairwise_iou(q.bboxes) <= IOU_THR
        suppressed += cand_boxes.shape[1] - len(q)
    if ltrb[0] > 0:
        assert suppressed > 0


def test_distinct_never_suppresses_across_images_hand_made():
    head = fcn().bbox_head
    # the same two boxes in both images, one reaching far above-left of it
    boxes = torch.tensor([[-1000., -1000., 10., 10.], [0., 0., 5., 5.]])
    boxes = boxes.expand(2, 2, 4).clone()
    scores = torch.tensor([[[0.9], [0.1]], [[0.8], [0.2]]])
    kept = head.distinct(scores, boxes)
    # each image alone: both boxes kept (IoU 25 / 1010^2)
    for b in range(2):
        _, ref = nms(boxes[b], scores[b, :, 0], IOU_THR)
        assert ref.tolist() == [0, 1]
        assert torch.equal(kept[b], ref)


def test_distinct_queries_do_not_depend_on_the_batch_on_score_maps():
    """Score and distance maps as the head outputs them (128x128 images):
    every point regresses a 1-stride box, but the P7 point's box reaches
    far above-left of the image (l, t = 50 strides, r, b = 0.1), as a
    large regression does; both images hold the same maps."""
    head = fcn().bbox_head
    sizes = (16, 8, 4, 2, 1)
    gen = torch.Generator().manual_seed(0)
    scores = [
        torch.rand(1, NUM_CLASSES, s, s, generator=gen).expand(
            2, -1, -1, -1).clone() * 0.5 for s in sizes
    ]
    distances = [torch.ones(2, 4, s, s) for s in sizes]
    distances[-1][:, :2] = 50.
    distances[-1][:, 2:] = 0.1
    scores[-1][0] = 0.9
    scores[-1][1] = 0.8
    batch = head.distinct_queries(scores, distances)
    for b in range(2):
        alone = head.distinct_queries([s[b:b + 1] for s in scores],
                                      [d[b:b + 1] for d in distances])[0]
        assert alone.point_ids[0] == 340  # the P7 point, the best score
        assert torch.equal(batch[b].point_ids, alone.point_ids)


# ----------------------------------------------------------------------
# DDQ FCN predictions
# ----------------------------------------------------------------------
def test_fcn_predict_returns_the_top_pairs_of_distinct_queries():
    model = fcn()
    enlarge_boxes(model.bbox_head)
    model.eval()
    inputs, samples = make_batch(seed=0, size=128)
    inputs, samples = prep(model, inputs, samples, False)
    with torch.no_grad():
        results = model.predict(inputs, copy.deepcopy(samples))
        outs = model.bbox_head(model.extract_feat(inputs))
        queries = model.bbox_head.distinct_queries(outs[0], outs[1])
        cand = model.bbox_head.candidates(outs[0], outs[1])[1]
    assert sum(len(q) for q in queries) < cand.shape[0] * cand.shape[1]
    for result, q in zip(results, queries):
        pred = result.pred_instances
        assert len(pred) == min(100, len(q) * NUM_CLASSES) == 100
        assert torch.all(pred.scores[:-1] >= pred.scores[1:])
        assert pred.scores.min() >= 0 and pred.scores.max() <= 1
        assert pred.labels.min() >= 0 and pred.labels.max() < NUM_CLASSES
        assert pred.bboxes.min() >= 0 and pred.bboxes.max() <= 128
        # the best (query, class) pairs of the distinct queries, with the
        # queries' boxes clipped to the image (clipping may make two
        # queries' boxes equal: match pairs, not boxes)
        top_scores, top = q.scores.flatten().topk(100)
        query_of = top // NUM_CLASSES
        torch.testing.assert_close(pred.scores, top_scores)
        assert torch.equal(pred.labels, top % NUM_CLASSES)
        torch.testing.assert_close(pred.bboxes,
                                   q.bboxes[query_of].clamp(0, 128))
        # distinct: the predicting queries' boxes pairwise <= the threshold,
        # and so are the predicted boxes (one per query) clipping left alone
        assert max_pairwise_iou(q.bboxes[query_of.unique()]) <= IOU_THR
        unique = torch.unique(pred.bboxes, dim=0)
        inside = unique[rows_in(unique, q.bboxes)]
        assert len(inside) > 1
        assert max_pairwise_iou(inside) <= IOU_THR


# ----------------------------------------------------------------------
# TopkHungarianAssignerPlus
# ----------------------------------------------------------------------
def assigner(topk=1, **kwargs):
    from mmdet.registry import TASK_UTILS
    build(FCN_CFG.model)  # registers everything
    return TASK_UTILS.build(
        dict(type='TopkHungarianAssignerPlus', topk=topk, **kwargs))


def mmdet_assigner(topk=1):
    from mmdet.registry import TASK_UTILS
    return TASK_UTILS.build(dict(type='TopkHungarianAssigner', topk=topk))


META = dict(img_shape=(100, 100))


def test_classification_cost_is_focal_cost_of_the_logits():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(12, NUM_CLASSES, generator=gen) * 0.98 + 0.01
    labels = torch.tensor([0, 3, 5, 3])
    boxes = torch.rand(12, 4, generator=gen) * 50
    ours = assigner().cls_cost(
        InstanceData(scores=probs, bboxes=boxes), InstanceData(labels=labels),
        META)
    focal = FocalLossCost(weight=2.0)
    on_logits = focal(
        InstanceData(scores=torch.logit(probs)), InstanceData(labels=labels),
        META)
    on_probs = focal(
        InstanceData(scores=probs), InstanceData(labels=labels), META)
    torch.testing.assert_close(ours, on_logits, rtol=1e-4, atol=1e-5)
    assert ours.shape == (12, 4)
    # mmdet 3.3 hands probabilities: a squashed, different cost
    assert not torch.allclose(on_probs, on_logits, rtol=0.1)
    assert (on_probs.max() - on_probs.min()) * 3 < (
        on_logits.max() - on_logits.min())
    # the option back off reproduces mmdet's cost
    off = assigner(cls_cost_on_logits=False).cls_cost(
        InstanceData(scores=probs, bboxes=boxes), InstanceData(labels=labels),
        META)
    torch.testing.assert_close(off, on_probs)


def test_logit_cost_picks_another_positive_than_mmdet():
    gt = torch.tensor([[10., 10., 50., 50.]])
    labels = torch.tensor([0])
    # A: confident, box shifted by 10; B: unsure, box exact
    boxes = torch.tensor([[20., 20., 60., 60.], [10., 10., 50., 50.]])
    scores = torch.tensor([[0.99, 0.01], [0.01, 0.01]])
    ours = assigner().assign(scores, boxes, gt, labels, dict(META))
    theirs = mmdet_assigner().assign(scores, boxes, gt, labels, dict(META))
    assert ours.gt_inds.tolist() == [1, 0]
    assert theirs.gt_inds.tolist() == [0, 1]


def test_cost_on_probabilities_option_assigns_as_mmdet():
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(30, NUM_CLASSES, generator=gen)
    xy = torch.rand(30, 2, generator=gen) * 60
    boxes = torch.cat([xy, xy + 10 + torch.rand(30, 2, generator=gen) * 30], 1)
    gts = boxes[[2, 7, 11]] + torch.rand(3, 4, generator=gen) * 4
    labels = torch.tensor([1, 4, 1])
    ours = assigner(
        topk=4, cls_cost_on_logits=False).assign(scores, boxes, gts, labels,
                                                 dict(META))
    theirs = mmdet_assigner(topk=4).assign(scores, boxes, gts, labels,
                                           dict(META))
    assert torch.equal(ours.gt_inds, theirs.gt_inds)
    torch.testing.assert_close(ours.max_overlaps, theirs.max_overlaps)


def _random_case(seed, num_preds=24, num_gts=3):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_preds, NUM_CLASSES, generator=gen)
    xy = torch.rand(num_preds, 2, generator=gen) * 60
    wh = 10 + torch.rand(num_preds, 2, generator=gen) * 30
    boxes = torch.cat([xy, xy + wh], 1)
    gts = boxes[:num_gts] + torch.rand(num_gts, 4, generator=gen) * 5
    labels = torch.randint(0, NUM_CLASSES, (num_gts, ), generator=gen)
    return gen, scores, boxes, gts, labels


def _check_result(result, allowed, boxes, gts, labels):
    pos = (result.gt_inds > 0).nonzero(as_tuple=True)[0]
    matched = result.gt_inds[pos] - 1
    assert allowed[pos, matched].all()
    assert torch.equal(result.labels[pos], labels[matched])
    assert (result.labels[result.gt_inds == 0] == -1).all()
    # per-positive values stay aligned with the positives kept
    assert len(result.max_overlaps) == len(pos)
    assert len(result.assign_metrics) == len(pos)
    torch.testing.assert_close(
        result.max_overlaps,
        bbox_overlaps(boxes[pos], gts[matched], is_aligned=True))
    return pos, matched


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_allowed_matches_random_masks(seed):
    gen, scores, boxes, gts, labels = _random_case(seed)
    allowed = torch.rand(len(boxes), len(gts), generator=gen) < 0.3
    topk = 4
    result = assigner(topk=topk).assign(
        scores, boxes, gts, labels, dict(META), allowed=allowed)
    pos, matched = _check_result(result, allowed, boxes, gts, labels)
    assert len(pos) > 0
    assert torch.bincount(matched, minlength=len(gts)).max() <= topk
    # an all-True mask changes nothing
    everything = torch.ones_like(allowed)
    free = assigner(topk=topk).assign(scores, boxes, gts, labels, dict(META))
    same = assigner(topk=topk).assign(
        scores, boxes, gts, labels, dict(META), allowed=everything)
    assert torch.equal(free.gt_inds, same.gt_inds)
    torch.testing.assert_close(free.assign_metrics, same.assign_metrics)


def test_allowed_matches_with_fewer_allowed_than_gts_times_topk():
    _, scores, boxes, gts, labels = _random_case(5, num_preds=20)
    # 5 allowed pairs for 3 gts x topk 4 = 12 slots: pred i only with gt i%3
    allowed = torch.zeros(20, 3, dtype=torch.bool)
    for i in range(5):
        allowed[i, i % 3] = True
    result = assigner(topk=4).assign(
        scores, boxes, gts, labels, dict(META), allowed=allowed)
    pos, matched = _check_result(result, allowed, boxes, gts, labels)
    # the forbidden cost makes the solver use every allowed pair
    assert pos.tolist() == [0, 1, 2, 3, 4]
    assert matched.tolist() == [0, 1, 2, 0, 1]
    # and a gt with no allowed prediction gets no positive at all
    allowed[:, 2] = False
    result = assigner(topk=4).assign(
        scores, boxes, gts, labels, dict(META), allowed=allowed)
    pos, matched = _check_result(result, allowed, boxes, gts, labels)
    assert 2 not in matched.tolist()
    assert pos.tolist() == [0, 1, 3, 4]


# ----------------------------------------------------------------------
# positives near the centre
# ----------------------------------------------------------------------
def test_near_centre_marks_the_k_nearest_points_of_each_level():
    head = fcn(positives_near_centre=9).bbox_head
    sizes = [(16, 12), (8, 6), (4, 3), (2, 2), (1, 1)]
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 2, generator=gen) * 90
    gts = torch.cat([xy, xy + 5 + torch.rand(4, 2, generator=gen) * 40], 1)
    mask = head.near_centre(sizes, gts)
    points = hand_points(sizes)
    assert mask.shape == (sum(len(p) for p in points), 4)
    centres = (gts[:, :2] + gts[:, 2:]) / 2
    start = 0
    for level_points in points:
        level = mask[start:start + len(level_points)]
        start += len(level_points)
        k = min(9, len(level_points))
        assert level.sum(0).tolist() == [k] * 4
        distance = torch.cdist(level_points, centres)
        for g in range(4):
            chosen, other = distance[level[:, g], g], distance[~level[:, g], g]
            if len(other):
                assert chosen.max() <= other.min() + 1e-4


def _main_positives(head, outs, gts, metas):
    """(queries, assign results) of the one-to-one loss."""
    captured = []
    original = head.main_loss.assigner.assign

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result)
        return result

    head.main_loss.assigner.assign = spy
    try:
        queries = head.distinct_queries(outs[0], outs[1])
        losses = head.loss_by_feat(*outs, gts, metas)
    finally:
        del head.main_loss.assigner.assign
    assert all(torch.isfinite(v) for v in losses.values())
    return queries, captured


@pytest.mark.parametrize('k', [9, 1])
def test_main_loss_positives_are_near_the_centre(k):
    model = fcn()
    head = model.bbox_head
    model.train()
    inputs, samples = make_batch(seed=0, size=128)
    inputs, samples = prep(model, inputs, samples, True)
    outs = head(model.extract_feat(inputs))
    gts = [s.gt_instances for s in samples]
    metas = [s.metainfo for s in samples]
    sizes = [s.shape[-2:] for s in outs[0]]

    def outside(queries, results):
        """How many positives lie outside the k points nearest their gt's
        centre on each level."""
        head.positives_near_centre = k
        count = 0
        for q, gt, result in zip(queries, gts, results):
            mask = head.near_centre(sizes, gt.bboxes)[q.point_ids]
            pos = (result.gt_inds > 0).nonzero(as_tuple=True)[0]
            assert len(pos) == len(gt.bboxes)
            count += int((~mask[pos, result.gt_inds[pos] - 1]).sum())
        return count

    head.positives_near_centre = None
    free = outside(*_main_positives(head, outs, gts, metas))
    head.positives_near_centre = k
    restricted = outside(*_main_positives(head, outs, gts, metas))
    assert restricted == 0
    if k == 1:  # here the restriction has something to do
        assert free > 0


# ----------------------------------------------------------------------
# DDQ R-CNN proposals: distinct, padded, never predicted
# ----------------------------------------------------------------------
@pytest.fixture(scope='module')
def padded():
    """A DDQ R-CNN on 64x64 images (86 points) whose larger boxes make the
    two images keep different numbers of distinct queries."""
    model = rcnn()
    enlarge_boxes(model.rpn_head)
    model.eval()
    inputs, samples = prep(model, *make_batch(seed=0, size=64), False)
    with torch.no_grad():
        x = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(x[1:], copy.deepcopy(samples))
    counts = [int(p.valid.sum()) for p in proposals]
    assert counts[0] != counts[1]
    return model, inputs, samples, x, proposals, counts


def test_rpn_proposals_are_distinct_queries_padded_to_the_batch(padded):
    model, inputs, samples, x, proposals, counts = padded
    head = model.rpn_head
    with torch.no_grad():
        outs = head(x[1:])
        queries = head.distinct_queries(outs[0], outs[1])
    size = max(counts)
    for p, q, count in zip(proposals, queries, counts):
        assert count == min(len(q), head.num_distinct_queries) < 86
        assert len(p) == size
        assert p.bboxes.shape == (size, 4)
        assert p.features.shape == (size, head.feat_channels)
        assert torch.equal(p.valid, torch.arange(size) < count)
        assert (p.bboxes[count:] == 0).all()
        assert (p.features[count:] == 0).all()
        torch.testing.assert_close(p.bboxes[:count], q.bboxes[:count])
        assert max_pairwise_iou(p.bboxes[:count]) <= IOU_THR
        assert torch.equal(p.imgs_whwh,
                           torch.tensor([64., 64., 64., 64.]).expand(size, 4))
    # features: compress(cls_feat | reg_feat) at each query's point
    image = counts.index(min(counts))
    q = queries[image]
    point_feats = torch.cat([
        torch.cat([f[image].flatten(1) for f in feats], 1).t()
        for feats in (outs[4], outs[5])
    ], 1)
    with torch.no_grad():
        expected = head.compress(point_feats[q.point_ids])
    torch.testing.assert_close(proposals[image].features[:len(q)], expected)


def test_padded_proposals_never_become_predictions(padded, monkeypatch):
    """At test a padded batch runs image by image on the real proposals:
    no stage ever sees a padding proposal, and every prediction is a real
    proposal's refined box."""
    model, inputs, samples, _, _, counts = padded
    roi_head = model.roi_head
    original = roi_head._bbox_forward
    seen_rois, last_boxes = [], []

    def recording(stage, x, rois, object_feats, metas):
        results = original(stage, x, rois, object_feats, metas)
        if stage == 0:
            seen_rois.append(rois)
        if stage == roi_head.num_stages - 1:
            last_boxes.extend(results['detached_proposals'])
        return results

    monkeypatch.setattr(roi_head, '_bbox_forward', recording)
    with torch.no_grad():
        results = model.predict(inputs, copy.deepcopy(samples))
    assert [len(r) for r in seen_rois] == counts  # one call per image
    for rois in seen_rois:
        assert (rois[:, 1:] != 0).any(-1).all()  # no zero (padding) box
    for result, boxes, count in zip(results, last_boxes, counts):
        pred = result.pred_instances
        assert len(pred) == min(100, count * NUM_CLASSES)
        assert rows_in(pred.bboxes, boxes).all()


def _predict_alone(model, inputs, samples, image):
    with torch.no_grad():
        return model.predict(inputs[image:image + 1],
                             copy.deepcopy(samples[image:image + 1]))[0]


def _assert_same_predictions(ours, alone):
    ours, alone = ours.pred_instances, alone.pred_instances
    assert len(ours) == len(alone)
    assert torch.equal(ours.labels, alone.labels)
    torch.testing.assert_close(ours.scores, alone.scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bboxes, alone.bboxes, rtol=1e-3, atol=1e-2)


def test_image_without_padding_predicts_as_alone(padded):
    model, inputs, samples, _, _, counts = padded
    image = counts.index(max(counts))
    with torch.no_grad():
        results = model.predict(inputs, copy.deepcopy(samples))
    _assert_same_predictions(results[image],
                             _predict_alone(model, inputs, samples, image))


def test_padded_image_predicts_as_alone(padded):
    model, inputs, samples, _, _, counts = padded
    image = counts.index(min(counts))
    with torch.no_grad():
        results = model.predict(inputs, copy.deepcopy(samples))
    _assert_same_predictions(results[image],
                             _predict_alone(model, inputs, samples, image))


# ----------------------------------------------------------------------
# the seed's options on the RoI side
# ----------------------------------------------------------------------
def test_flexible_roi_extractor_averages_the_level_and_its_neighbours():
    from mmdet.registry import MODELS
    build(FCN_CFG.model)  # registers everything
    strides = [4, 8, 16, 32]
    extractor = MODELS.build(
        dict(
            type='FlexibleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2),
            out_channels=8,
            featmap_strides=strides))
    gen = torch.Generator().manual_seed(0)
    feats = [
        torch.randn(2, 8, 256 // s, 256 // s, generator=gen) for s in strides
    ]
    sides = torch.tensor([20., 60., 130., 180., 250., 400., 500.])
    rois = torch.stack([
        torch.arange(len(sides)).float() % 2,
        torch.full_like(sides, 3.),
        torch.full_like(sides, 5.), 3. + sides, 5. + sides
    ], 1)  # square: scale = side
    out = extractor(feats, rois)
    assert out.shape == (len(sides), 8, 7, 7)
    # mmdet's mapping: level floor(log2(scale / 56)) in [0, 3]
    level = torch.floor(torch.log2(sides / 56 + 1e-6)).clamp(0, 3).long()
    assert set(level.tolist()) == {0, 1, 2, 3}
    for i, lvl in enumerate(level.tolist()):
        used = [v for v in (lvl - 1, lvl, lvl + 1) if 0 <= v <= 3]
        pooled = [
            roi_align(feats[v], rois[i:i + 1], (7, 7), 1. / strides[v], 2,
                      'avg', True) for v in used
        ]
        torch.testing.assert_close(out[i:i + 1], sum(pooled) / len(pooled))
    # not SingleRoIExtractor: the mapped level alone differs
    single = roi_align(feats[level[2]], rois[2:3], (7, 7),
                       1. / strides[level[2]], 2, 'avg', True)
    assert not torch.allclose(out[2:3], single)


def test_query_roi_fusion_changes_stage_zero_features_and_trains(monkeypatch):
    extractor = dict(
        RCNN_CFG.model.roi_head.bbox_roi_extractor,
        type='FlexibleRoIExtractor')
    model = rcnn(
        roi_options=dict(query_roi_fusion=True, bbox_roi_extractor=extractor))
    roi_head = model.roi_head
    assert isinstance(roi_head.query_fusion, nn.Linear)
    assert (roi_head.query_fusion.in_features,
            roi_head.query_fusion.out_features) == (256, 128)
    assert type(roi_head.bbox_roi_extractor[0]).__name__ == \
        'FlexibleRoIExtractor'
    plain = rcnn()
    assert plain.roi_head.query_fusion is None

    model.eval()
    inputs, samples = prep(model, *make_batch(seed=0, size=64), False)
    seen = []
    original = roi_head._bbox_forward

    def spy(stage, x, rois, object_feats, metas):
        if stage == 0:
            seen.append(object_feats.detach().clone())
        return original(stage, x, rois, object_feats, metas)

    monkeypatch.setattr(roi_head, '_bbox_forward', spy)
    with torch.no_grad():
        x = model.extract_feat(inputs)
        proposals = model.rpn_head.predict(x[1:], copy.deepcopy(samples))
        raw = torch.stack([p.features for p in proposals])
        rois = torch.cat([
            torch.cat([torch.full((len(p), 1), float(i)), p.bboxes], 1)
            for i, p in enumerate(proposals)
        ])
        pooled = roi_head.bbox_roi_extractor[0](x[:6], rois).mean((2, 3))
        expected = roi_head.query_fusion(
            torch.cat([raw.flatten(0, 1), pooled], -1)).view_as(raw)
        model.roi_head.predict(x, copy.deepcopy(proposals), samples)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected)
    assert not torch.allclose(seen[0], raw)

    monkeypatch.undo()
    model.train()
    inputs, samples = prep(model, *make_batch(seed=0, size=64), True)
    losses = model.loss(inputs, samples)
    assert all(torch.isfinite(v) for v in losses.values())
    loss_total(losses).backward()
    assert roi_head.query_fusion.weight.grad is not None
    assert roi_head.query_fusion.weight.grad.abs().sum() > 0
    assert parameters_without_grad(model) == []


# ----------------------------------------------------------------------
# empty ground truth
# ----------------------------------------------------------------------
BOX_LOSSES = ('loss_bbox', 'loss_iou')


@pytest.mark.parametrize('num_gts', [(0, 3), (0, 0)])
@pytest.mark.parametrize('kind', ['fcn', 'fcn_near_centre', 'rcnn'])
def test_empty_ground_truth(kind, num_gts):
    model = dict(
        fcn=fcn,
        rcnn=rcnn,
        fcn_near_centre=lambda: fcn(positives_near_centre=9))[kind]()
    model.train()
    inputs, samples = prep(model, *make_batch(num_gts, seed=2, size=64), True)
    losses = model.loss(inputs, samples)
    assert all(torch.isfinite(v).all() for v in losses.values())
    if sum(num_gts) == 0:
        for key, value in losses.items():
            if any(key.endswith(name) for name in BOX_LOSSES):
                assert value == 0, key
        if kind == 'rcnn':
            assert losses['s0.loss_cls'] > 0 and losses['s1.loss_cls'] > 0
    else:
        assert losses[[k for k in losses if k.endswith('loss_bbox')][0]] > 0
    loss_total(losses).backward()
    assert parameters_without_grad(model) == []


# ----------------------------------------------------------------------
# the shapes configs
# ----------------------------------------------------------------------
def _one_step(model, size=128):
    model.train()
    inputs, samples = prep(model, *make_batch(seed=1, size=size), True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = model.loss(inputs, samples)
    optimizer.zero_grad()
    loss_total(losses).backward()
    assert parameters_without_grad(model) == []
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    changed = sum(not torch.equal(b, p)
                  for b, p in zip(before, model.parameters()))
    assert changed > len(before) // 2
    return losses


def test_fcn_config_trains_one_step():
    from projects_detr_plus.models.detectors import DDQFCN
    from projects_detr_plus.models.heads import DDQFCNHead
    model = fcn()
    assert type(model) is DDQFCN and type(model.bbox_head) is DDQFCNHead
    assert model.bbox_head.num_classes == NUM_CLASSES
    assert model.bbox_head.num_distinct_queries == 100
    assert model.bbox_head.dqs_cfg == dict(type='nms', iou_threshold=0.7)
    assert model.bbox_head.nms_pre == 1000
    losses = _one_step(model)
    assert set(losses) == {
        'loss_cls', 'loss_bbox', 'aux_loss_cls', 'aux_loss_bbox'
    }
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_rcnn_config_trains_one_step():
    from projects_detr_plus.models.detectors import DDQRCNN
    from projects_detr_plus.models.heads import DDQFCNRPNHead
    from projects_detr_plus.models.roi_heads import DDQSparseRoIHead
    model = rcnn()
    assert type(model) is DDQRCNN
    assert type(model.rpn_head) is DDQFCNRPNHead
    assert type(model.roi_head) is DDQSparseRoIHead
    losses = _one_step(model)
    stage_keys = {
        f's{i}.{name}'
        for i in range(2)
        for name in ('loss_cls', 'pos_acc', 'loss_bbox', 'loss_iou')
    }
    assert set(losses) == {
        'rpn_loss_cls', 'rpn_loss_bbox', 'rpn_aux_loss_cls',
        'rpn_aux_loss_bbox', 'rpn_num_distinct'
    } | stage_keys
    for key, value in losses.items():
        assert torch.isfinite(value), key
        if 'loss' in key:
            assert value > 0, key


def test_rpn_stage_trains_with_the_real_labels():
    model = rcnn()
    assert model.rpn_head.num_classes == NUM_CLASSES
    assert model.rpn_head.conv_cls.out_channels == NUM_CLASSES
    assert model.rpn_head.aux_conv_cls.out_channels == NUM_CLASSES
    model.train()
    inputs, samples = prep(model, *make_batch(seed=0, size=64), True)
    relabelled = copy.deepcopy(samples)
    labels = relabelled[0].gt_instances.labels
    labels[0] = (labels[0] + 1) % NUM_CLASSES
    with torch.no_grad():
        first = model.loss(inputs, copy.deepcopy(samples))
        again = model.loss(inputs, copy.deepcopy(samples))
        other = model.loss(inputs, relabelled)
    assert first['rpn_loss_cls'] == again['rpn_loss_cls']
    assert other['rpn_loss_cls'] != first['rpn_loss_cls']
    # labels are not zeroed on the way: the samples keep them
    assert samples[0].gt_instances.labels.max() > 0
