"""MS-DETR (implementation (a)) against the authors' criterion, and as a
branch of our detectors (see ``projects_detr_plus/models/branches/
ms_detr.py``)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmengine.structures import InstanceData

import ms_detr_reference
import projects_detr_plus.models.branches.ms_detr  # noqa: F401 (registers)
from detr_testing import (build, ddq_cfg, deformable_detr_cfg, dino_cfg,
                          losses_with_seed, make_batch, predict)
from projects_detr_plus.models.branches import SetPredictions
from projects_detr_plus.models.branches.ms_detr import MSDETRBranch
from projects_detr_plus.models.task_modules.o2m_assigner import MSDETRAssigner

NUM_CLASSES, NUM_QUERIES, NUM_LAYERS, DIMS = 5, 30, 6, 32
SHAPES = ((96, 128), (80, 112), (64, 64))  # (h, w) per image
NUM_GTS = (3, 4, 1)
SEED = 11
RTOL = 1e-5  # fp32, every loss term and gradient (observed: 2e-7)
# impl_a/main.py: --o2m_cls_loss_coef 2, --o2m_bbox_loss_coef 5,
# --o2m_giou_loss_coef 2
REF_WEIGHTS = dict(loss_ce=2.0, loss_bbox=5.0, loss_giou=2.0)
OURS = dict(loss_ce='loss_cls', loss_bbox='loss_bbox', loss_giou='loss_iou')

needs_reference = pytest.mark.skipif(
    not ms_detr_reference.available(),
    reason='the authors\' code is not at ../shared/reference')


def _problem(seed=0):
    """Ground truth (pixel xyxy) and, for 6 layers, hidden states, the
    o2m class heads' weights and boxes near the ground truth.  Image 0 has
    two nearly equal boxes of different classes (queries in the top k of
    both), image 2 a single box (more than k sampled positives)."""
    gen = torch.Generator().manual_seed(seed)
    samples, near = [], []
    for count, (h, w) in zip(NUM_GTS, SHAPES):
        centre = torch.rand(count, 2, generator=gen) * 0.5 + 0.25
        size = torch.rand(count, 2, generator=gen) * 0.3 + 0.15
        boxes = torch.cat([centre, size], 1)
        labels = torch.randint(0, NUM_CLASSES, (count, ), generator=gen)
        if count > 2:
            boxes[1] = boxes[0] + 0.01
            labels[1] = (labels[0] + 1) % NUM_CLASSES
        scale = torch.tensor([w, h, w, h], dtype=torch.float)
        samples.append(
            DetDataSample(
                metainfo=dict(img_shape=(h, w)),
                gt_instances=InstanceData(
                    bboxes=bbox_cxcywh_to_xyxy(boxes) * scale, labels=labels)))
        near.append(boxes[torch.arange(NUM_QUERIES) % count])
    noise = torch.randn(
        NUM_LAYERS, len(NUM_GTS), NUM_QUERIES, 4, generator=gen) * 0.05
    tensors = dict(
        hs=torch.randn(
            NUM_LAYERS, len(NUM_GTS), NUM_QUERIES, DIMS, generator=gen),
        box=(torch.stack(near) + noise).clamp(0.05, 0.95),
        weight=torch.randn(NUM_LAYERS, NUM_CLASSES, DIMS, generator=gen) * 0.3,
        bias=torch.randn(NUM_LAYERS, NUM_CLASSES, generator=gen) - 1.0)
    for value in tensors.values():
        value.requires_grad_(True)
    return samples, tensors


def _targets(samples):
    """The reference's targets: normalised cxcywh, as the branch makes
    them from the pixel boxes."""
    targets = []
    for s in samples:
        h, w = s.metainfo['img_shape']
        factor = torch.tensor([w, h, w, h], dtype=torch.float)
        targets.append(
            dict(
                boxes=bbox_xyxy_to_cxcywh(s.gt_instances.bboxes / factor),
                labels=s.gt_instances.labels))
    return targets


def _branch(t, assigner=(), **kwargs):
    branch = MSDETRBranch(
        NUM_CLASSES,
        DIMS,
        NUM_QUERIES,
        num_layers=NUM_LAYERS,
        assigner=dict(type='MSDETRAssigner', **dict(assigner)),
        **kwargs)
    with torch.no_grad():
        for layer, fc in enumerate(branch.cls_branches):
            fc.weight.copy_(t['weight'][layer])
            fc.bias.copy_(t['bias'][layer])
    return branch


def _our_losses(samples, t, assigner=(), seed=SEED, **kwargs):
    """Our losses and the gradient inputs (the heads' own parameters
    stand for ``weight`` and ``bias``)."""
    branch = _branch(t, assigner, **kwargs)
    main = SetPredictions(torch.zeros(0), t['box'], t['hs'], [])
    torch.manual_seed(seed)
    losses = branch.supervise_main(SimpleNamespace(), main, samples)
    inputs = dict(
        hs=t['hs'],
        box=t['box'],
        weight=[fc.weight for fc in branch.cls_branches],
        bias=[fc.bias for fc in branch.cls_branches])
    return losses, inputs


def _their_losses(samples, t):
    detr, matcher, _ = ms_detr_reference.load()
    # impl_a's SetCriterion defaults: o2m_matcher_threshold=0.4,
    # o2m_matcher_k=6, focal_alpha 0.25; the one-to-one matcher's costs
    # (set_cost_* 2 / 5 / 2) do not enter the o2m terms
    criterion = detr.SetCriterion(
        NUM_CLASSES,
        matcher.HungarianMatcher(2.0, 5.0, 2.0), {},
        ['labels', 'boxes', 'cardinality'],
        num_queries=NUM_QUERIES)
    logits = torch.stack([
        F.linear(t['hs'][i], t['weight'][i], t['bias'][i])
        for i in range(NUM_LAYERS)
    ])

    def layer(cls, box):
        return dict(pred_logits=cls, pred_boxes=box)

    o2m = dict(
        layer(logits[-1], t['box'][-1]),
        aux_outputs=[
            layer(logits[i], t['box'][i]) for i in range(NUM_LAYERS - 1)
        ])
    outputs = dict(
        layer(logits[-1].detach(), t['box'][-1].detach()), o2m_outputs=o2m)
    torch.manual_seed(SEED)
    raw = criterion(outputs, _targets(samples))
    return {
        _our_name(key): value * REF_WEIGHTS[_base(key)]
        for key, value in raw.items()
        if key.startswith('loss_') and key.endswith('_o2m')
    }


def _base(key):
    return '_'.join(key.split('_')[:2])


def _our_name(key):
    """``loss_ce_o2m`` -> ``o2m_loss_cls``, ``loss_giou_3_o2m`` ->
    ``d3.o2m_loss_iou``."""
    rest = key.split('_')[2:-1]
    layer = f'd{rest[0]}.' if rest else ''
    return f'{layer}o2m_{OURS[_base(key)]}'


def _copy(t):
    return {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}


@needs_reference
def test_assignment_equals_the_authors():
    """Every layer and image: the same pairs in the same order as
    ``Stage2Assigner`` under the same seed; the problem samples (more
    positives than ``int(0.25 n)``), caps at k and has queries in two
    ground truths' top k."""
    _, _, o2m = ms_detr_reference.load()
    samples, t = _problem()
    targets = _targets(samples)
    ours, theirs = MSDETRAssigner(), o2m.Stage2Assigner()
    sampled = capped = shared = 0
    for layer in range(NUM_LAYERS):
        with torch.no_grad():
            logits = torch.stack([
                F.linear(h, t['weight'][layer], t['bias'][layer])
                for h in t['hs'][layer]
            ])
        torch.manual_seed(SEED + layer)
        expected = theirs(
            dict(pred_logits=logits, pred_boxes=t['box'][layer].detach()),
            targets)
        torch.manual_seed(SEED + layer)
        for image, target in enumerate(targets):
            args = (logits[image], t['box'][layer, image], target['boxes'],
                    target['labels'])
            query, gt = ours.assign(*args)
            assert torch.equal(query, expected[image][0])
            assert torch.equal(gt, expected[image][1])
            positive, _ = ours.positives(ours.scores(*args))
            sampled += int(positive.sum()) > int(0.25 * NUM_QUERIES)
            capped += bool((torch.bincount(gt) == 6).any())
            shared += len(query.unique()) < len(query)
    assert sampled and capped and shared, (sampled, capped, shared)


@needs_reference
def test_losses_and_gradients_equal_the_authors():
    """Every o2m term of the 6 layers and the gradients of the hidden
    states, boxes and o2m class heads equal the official criterion's,
    ``torch.manual_seed`` set alike before both (its ``randperm`` draws)."""
    samples, tensors = _problem()
    ours, inputs = _our_losses(samples, tensors)
    again = _copy(tensors)
    theirs = _their_losses(samples, again)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 3 * NUM_LAYERS
    for key in ours:
        torch.testing.assert_close(
            ours[key].reshape(()),
            theirs[key].reshape(()),
            rtol=RTOL,
            atol=0,
            msg=key)
    mine = torch.autograd.grad(
        sum(v.sum() for v in ours.values()),
        [inputs['hs'], inputs['box'], *inputs['weight'], *inputs['bias']])
    grads_ours = dict(
        hs=mine[0],
        box=mine[1],
        weight=torch.stack(mine[2:2 + NUM_LAYERS]),
        bias=torch.stack(mine[2 + NUM_LAYERS:]))
    grads_theirs = dict(
        zip(
            grads_ours,
            torch.autograd.grad(
                sum(v.sum() for v in theirs.values()),
                [again[name] for name in grads_ours])))
    for name, grad in grads_ours.items():
        expected = grads_theirs[name]
        assert (grad - expected).norm() <= \
            RTOL * expected.norm(), name


@needs_reference
@pytest.mark.parametrize('change', ['k', 'threshold', 'mix', 'weight', 'seed'])
def test_the_comparison_sees_one_changed_detail(change):
    """k 6 -> 5, threshold 0.4 -> 0.5, the score 0.7 / 0.3 -> 0.6 / 0.4,
    the o2m classification weight 2 -> 1 or another seed (the sampling of
    the positives matters here) on our side breaks the equality."""
    samples, tensors = _problem()
    assigner = dict(
        k=dict(k=5),
        threshold=dict(threshold=0.5),
        mix=dict(iou_weight=0.6, cls_weight=0.4)).get(change, {})
    kwargs = dict(loss_cls=dict(type='FocalLoss', use_sigmoid=True,
                                gamma=2.0, alpha=0.25, loss_weight=1.0)) \
        if change == 'weight' else {}
    ours, _ = _our_losses(
        samples, tensors, assigner, seed=SEED + (change == 'seed'), **kwargs)
    theirs = _their_losses(samples, _copy(tensors))
    worst = max(
        float((ours[k] - theirs[k]).abs().max().detach() /
              theirs[k].abs().max().detach()) for k in ours)
    assert worst > 1e-3


MS_DETR = dict(type='MSDETRBranch', num_layers=2)


def _ddetr_pp(branch=True, **branch_args):
    """A tiny Deformable DETR++ (two-stage, refine, mixed selection, look
    forward twice), with the branch or without."""
    cfg = deformable_detr_cfg(
        refine=True,
        two_stage=True,
        mixed_selection=True,
        look_forward_twice=True)
    cfg['bbox_head']['loss_cls']['loss_weight'] = 1.0
    if branch:
        cfg['branches'] = [dict(MS_DETR, **branch_args)]
    return cfg


def _dino(branch=True):
    return dino_cfg(dims=128, branches=[MS_DETR] if branch else ())


def _ddq(branch=True):
    """DDQ-DETR: the o2m loss over each layer's distinct queries."""
    cfg = ddq_cfg(dims=128)
    if branch:
        cfg['branches'] = [dict(MS_DETR)]
    return cfg


def _pair(cfg_fn, **branch_args):
    """(with the branch, without), the same weights but the branch's."""
    torch.manual_seed(0)
    base = build(cfg_fn(branch=False))
    torch.manual_seed(0)
    ours = build(cfg_fn(**branch_args))
    missing, unexpected = ours.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(
        k.startswith('extra_branches.0.cls_branches') for k in missing)
    return ours, base


O2M_KEYS = sorted([f'o2m_loss_{t}' for t in ('cls', 'bbox', 'iou')] +
                  ['d0.o2m_loss_cls', 'd0.o2m_loss_bbox', 'd0.o2m_loss_iou'])


@pytest.mark.parametrize(
    'cfg_fn', [_ddetr_pp, _dino, _ddq],
    ids=['deformable-detr-pp', 'dino', 'ddq'])
def test_it_adds_its_keys_and_leaves_every_other_loss(cfg_fn):
    """On two-stage Deformable DETR++, DINO (denoising included) and DDQ:
    the o2m terms of every layer are added, every other loss is
    bit-identical (the denoising noise is drawn before the branch's
    ``randperm``), the terms train the o2m heads and the shared box head,
    and the random draws shift the global generator after the loss."""
    ours, base = _pair(cfg_fn)
    inputs, samples = make_batch()
    ours.train(), base.train()
    plain = losses_with_seed(base, inputs, samples)
    after_plain = torch.rand(1)
    more = losses_with_seed(ours, inputs, samples)
    after_more = torch.rand(1)
    assert sorted(set(more) - set(plain)) == O2M_KEYS
    for key, value in plain.items():
        assert torch.equal(value, more[key]), key
    assert all(torch.isfinite(more[k]) and more[k] > 0 for k in O2M_KEYS)
    assert not torch.equal(after_plain, after_more)
    again = losses_with_seed(ours, inputs, samples)
    for key in O2M_KEYS:
        assert torch.equal(more[key], again[key]), key
    sum(more[k] for k in O2M_KEYS).backward()
    branch = ours.extra_branches[0]
    assert all(fc.weight.grad.abs().sum() > 0 for fc in branch.cls_branches)
    assert ours.bbox_head.reg_branches[0][-1].weight.grad.abs().sum() > 0
    assert ours.bbox_head.cls_branches[0].weight.grad is None


@pytest.mark.parametrize(
    'cfg_fn', [_ddetr_pp, _dino], ids=['deformable-detr-pp', 'dino'])
def test_inference_is_the_base_models(cfg_fn):
    """Same weights, same predictions: the o2m heads take no part."""
    ours, base = _pair(cfg_fn)
    inputs, samples = make_batch()
    for a, b in zip(
            predict(ours, inputs, samples), predict(base, inputs, samples)):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
        assert torch.equal(a.pred_instances.scores, b.pred_instances.scores)
        assert torch.equal(a.pred_instances.labels, b.pred_instances.labels)


def test_encoder_loss_weights():
    """``encoder_loss_weights`` (2, 5, 2) with a head of weights 1 / 5 / 2
    (MS-DETR's --cls_loss_coef 1 and --enc_*_loss_coef): the encoder's
    classification term doubles, the others stay."""
    ours, base = _pair(_ddetr_pp, encoder_loss_weights=(2.0, 5.0, 2.0))
    inputs, samples = make_batch()
    ours.train(), base.train()
    more = losses_with_seed(ours, inputs, samples)
    plain = losses_with_seed(base, inputs, samples)
    torch.testing.assert_close(more['enc_loss_cls'], 2 * plain['enc_loss_cls'])
    for key in ('enc_loss_bbox', 'enc_loss_iou', 'loss_cls', 'd0.loss_cls'):
        torch.testing.assert_close(more[key], plain[key])


def test_images_without_ground_truth():
    """No pairs: every query is background, no box loss."""
    torch.manual_seed(0)
    model = build(_ddetr_pp())
    model.train()
    inputs, samples = make_batch(num_gts=(0, 2))
    losses = losses_with_seed(model, inputs, samples)
    assert all(torch.isfinite(losses[k]) for k in O2M_KEYS)
    inputs, samples = make_batch(num_gts=(0, 0))
    losses = losses_with_seed(model, inputs, samples)
    for key in O2M_KEYS:
        assert (losses[key] > 0) if 'cls' in key else (losses[key] == 0)


def test_the_number_of_layers_is_checked():
    torch.manual_seed(0)
    model = build(_ddetr_pp(num_layers=6))
    model.train()
    inputs, samples = make_batch()
    with pytest.raises(ValueError, match='num_layers=6'):
        losses_with_seed(model, inputs, samples)
