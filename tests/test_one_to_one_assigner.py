"""OneToOneAssigner: equal to mmdet's HungarianAssigner, optimal, batched."""
import itertools

import pytest
import torch
from mmdet.models.task_modules.assigners import HungarianAssigner
from mmdet.registry import TASK_UTILS
from mmengine.structures import InstanceData

import projects_detr_plus.models.task_modules  # noqa: F401  (registration)
from projects_detr_plus.models.task_modules import (OneToOneAssigner,
                                                    one_to_one_assigner)

NUM_CLASSES = 6
DINO_COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0)
]
DETR_COSTS = [
    dict(type='ClassificationCost', weight=1.0),
    dict(type='BBoxL1Cost', weight=5.0),
    dict(type='IoUCost', iou_mode='iou', weight=2.0)
]


def _boxes(n, h, w, gen):
    """(n, 4) random absolute xyxy boxes inside an (h, w) image."""
    xy = torch.rand(n, 2, 2, generator=gen) * torch.tensor([w, h])
    return torch.cat([xy.min(1).values, xy.max(1).values + 1], dim=1)


def _case(num_preds, num_gts, img_shape, gen):
    """Random (pred_instances, gt_instances, img_meta) of one image."""
    h, w = img_shape
    preds = InstanceData(
        scores=torch.randn(num_preds, NUM_CLASSES, generator=gen),
        bboxes=_boxes(num_preds, h, w, gen))
    gts = InstanceData(
        labels=torch.randint(0, NUM_CLASSES, (num_gts, ), generator=gen),
        bboxes=_boxes(num_gts, h, w, gen))
    return preds, gts, dict(img_shape=img_shape)


def _batch(seed, num_gts, num_preds=10):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(200, 900, (1, ), generator=gen)),
               int(torch.randint(200, 900, (1, ), generator=gen)))
              for _ in num_gts]
    cases = [_case(num_preds, g, s, gen) for g, s in zip(num_gts, shapes)]
    return tuple(map(list, zip(*cases)))


def _assert_same(result, expected):
    assert result.num_gts == expected.num_gts
    assert torch.equal(result.gt_inds, expected.gt_inds)
    assert torch.equal(result.labels, expected.labels)
    assert result.gt_inds.dtype == result.labels.dtype == torch.long


@pytest.mark.parametrize('costs', [DINO_COSTS, DETR_COSTS])
@pytest.mark.parametrize('seed', range(4))
def test_assign_equals_mmdet_hungarian(costs, seed):
    ours, theirs = OneToOneAssigner(costs), HungarianAssigner(costs)
    preds, gts, metas = _batch(seed, [0, 1, 3, 7, 10, 15])
    for p, g, m in zip(preds, gts, metas):
        result = ours.assign(p, g, m)
        _assert_same(result, theirs.assign(p, g, m))
        num_pos = int((result.gt_inds > 0).sum())
        assert num_pos == min(len(p), len(g))  # 15 gts > 10 queries: 10 pos
        assert (result.labels[result.gt_inds == 0] == -1).all()


def _brute_force_min(cost):
    """Minimum total of an injective matching of the smaller side."""
    q, g = len(cost), len(cost[0])
    if q >= g:
        return min(
            sum(cost[r][c] for c, r in enumerate(rows))
            for rows in itertools.permutations(range(q), g))
    return min(
        sum(cost[r][c] for r, c in enumerate(cols))
        for cols in itertools.permutations(range(g), q))


@pytest.mark.parametrize('seed', range(6))
def test_assignment_is_optimal(seed):
    assigner = OneToOneAssigner(DINO_COSTS)
    gen = torch.Generator().manual_seed(100 + seed)
    for num_preds, num_gts in [(4, 1), (5, 3), (6, 4), (4, 4), (3, 5)]:
        p, g, m = _case(num_preds, num_gts, (300 + seed, 500), gen)
        cost = sum(TASK_UTILS.build(c)(p, g, m) for c in DINO_COSTS).double()
        result = assigner.assign(p, g, m)
        pos = torch.nonzero(result.gt_inds > 0).squeeze(1)
        ours = cost[pos, result.gt_inds[pos] - 1].sum().item()
        assert len(pos) == min(num_preds, num_gts)
        assert result.gt_inds[pos].unique().numel() == len(pos)
        assert ours == pytest.approx(
            _brute_force_min(cost.tolist()), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize('costs', [DINO_COSTS, DETR_COSTS])
@pytest.mark.parametrize('seed', range(4))
def test_batch_equals_per_image(costs, seed):
    assigner = OneToOneAssigner(costs)
    mmdet_assigner = HungarianAssigner(costs)
    preds, gts, metas = _batch(seed, [5, 0, 12, 1, 3])
    results = assigner.assign_batch(preds, gts, metas)
    assert len(results) == 5
    for result, p, g, m in zip(results, preds, gts, metas):
        _assert_same(result, assigner.assign(p, g, m))
        _assert_same(result, mmdet_assigner.assign(p, g, m))


def test_batch_cost_blocks_match_per_image_costs():
    """Per-image box normalisation: each block equals that image's cost."""
    assigner = OneToOneAssigner(DINO_COSTS)
    preds, gts, metas = _batch(7, [4, 2, 6])
    cost = assigner._batch_cost(preds, gts, metas)
    blocks = one_to_one_assigner._diagonal_blocks(cost, [10] * 3, [4, 2, 6])
    for block, p, g, m in zip(blocks, preds, gts, metas):
        expected = assigner._total_cost(p, g, m).numpy()
        assert block.shape == expected.shape
        assert torch.allclose(
            torch.from_numpy(block), torch.from_numpy(expected), atol=1e-5)


def _no_scipy(*args, **kwargs):
    raise AssertionError('linear_sum_assignment must not be called')


def test_empty_gt_all_negative_without_scipy(monkeypatch):
    monkeypatch.setattr(one_to_one_assigner, 'linear_sum_assignment',
                        _no_scipy)
    assigner = OneToOneAssigner(DINO_COSTS)
    preds, gts, metas = _batch(0, [0, 0], num_preds=7)
    for result in [
            assigner.assign(preds[0], gts[0], metas[0]),
            *assigner.assign_batch(preds, gts, metas)
    ]:
        assert result.num_gts == 0
        assert torch.equal(result.gt_inds, torch.zeros(7, dtype=torch.long))
        assert torch.equal(result.labels, torch.full((7, ), -1))


def test_zero_predictions(monkeypatch):
    monkeypatch.setattr(one_to_one_assigner, 'linear_sum_assignment',
                        _no_scipy)
    assigner = OneToOneAssigner(DINO_COSTS)
    preds, gts, metas = _batch(1, [3, 0], num_preds=0)
    expected = HungarianAssigner(DINO_COSTS).assign(preds[0], gts[0], metas[0])
    for result in [
            assigner.assign(preds[0], gts[0], metas[0]),
            *assigner.assign_batch(preds, gts, metas)
    ]:
        assert result.gt_inds.shape == result.labels.shape == (0, )
    result = assigner.assign(preds[0], gts[0], metas[0])
    assert result.num_gts == expected.num_gts == 3


def test_batch_with_one_image_without_predictions():
    assigner = OneToOneAssigner(DINO_COSTS)
    preds, gts, metas = _batch(2, [3, 2])
    preds[0] = preds[0][:0]
    results = assigner.assign_batch(preds, gts, metas)
    assert results[0].gt_inds.shape == (0, )
    _assert_same(results[1], assigner.assign(preds[1], gts[1], metas[1]))


def test_nan_cost_raises_clear_error():
    assigner = OneToOneAssigner(DINO_COSTS)
    preds, gts, metas = _batch(3, [2, 3, 4])
    preds[2].bboxes[5, 0] = float('nan')
    with pytest.raises(ValueError, match=r'image 2 .* [1-9]\d* NaN.*query 5'):
        assigner.assign_batch(preds, gts, metas)
    with pytest.raises(ValueError, match='NaN'):
        assigner.assign(preds[2], gts[2], metas[2])
    preds[2].bboxes[5, 0] = 1.0
    preds[2].bboxes[1, 2] = float('inf')
    with pytest.raises(ValueError, match=r'image 2 .* [1-9]\d* inf.*query 1'):
        OneToOneAssigner(DINO_COSTS[1]).assign_batch(preds, gts, metas)


def test_built_from_registry_is_ours():
    cfg = dict(type='OneToOneAssigner', match_costs=DINO_COSTS)
    assigner = TASK_UTILS.build(cfg)
    assert type(assigner) is OneToOneAssigner
    assert TASK_UTILS.get('HungarianAssigner') is HungarianAssigner
    single = TASK_UTILS.build(
        dict(type='OneToOneAssigner', match_costs=DINO_COSTS[0]))
    assert len(single.match_costs) == 1


def test_detr_head_targets_equal_with_hungarian_assigner():
    from mmdet.models.dense_heads import DETRHead

    def targets(assigner_type):
        torch.manual_seed(0)
        head = DETRHead(
            num_classes=NUM_CLASSES,
            embed_dims=16,
            loss_cls=dict(
                type='CrossEntropyLoss',
                bg_cls_weight=0.1,
                use_sigmoid=False,
                class_weight=1.0),
            train_cfg=dict(
                assigner=dict(type=assigner_type, match_costs=DETR_COSTS)))
        gen = torch.Generator().manual_seed(11)
        _, gts, metas = _batch(11, [4, 0, 9])
        scores = [torch.randn(10, NUM_CLASSES + 1, generator=gen) for _ in gts]
        boxes = [torch.rand(10, 4, generator=gen) * 0.5 + 0.1 for _ in gts]
        return head.get_targets(scores, boxes, gts, metas)

    ours, theirs = targets('OneToOneAssigner'), targets('HungarianAssigner')
    assert ours[4:] == theirs[4:]  # num_total_pos, num_total_neg
    for our_list, their_list in zip(ours[:4], theirs[:4]):
        for a, b in zip(our_list, their_list):
            assert torch.equal(a, b)
