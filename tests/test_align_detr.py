"""Align-DETR against the authors' criterion, and as a branch of our
detectors (see ``projects_detr_plus/models/branches/align_detr.py``)."""
from types import SimpleNamespace

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmengine.structures import InstanceData

import align_detr_reference
from detr_testing import build, dino_cfg, losses_with_seed, make_batch, predict
from projects_detr_plus.models.branches import (AlignDETRBranch,
                                                DenoisingBranch,
                                                SetPredictions)
from projects_detr_plus.models.losses import layer_loss_dict, layer_losses

NUM_CLASSES, NUM_QUERIES, NUM_LAYERS = 5, 30, 6
SHAPES = ((96, 128), (80, 112))  # (h, w) per image
NUM_GTS = (3, 4)
DN_GROUPS = 2
REF_WEIGHTS = dict(loss_class=1.0, loss_bbox=5.0, loss_giou=2.0)
OURS = dict(loss_class='loss_cls', loss_bbox='loss_bbox', loss_giou='loss_iou')

needs_reference = pytest.mark.skipif(
    not align_detr_reference.available(),
    reason='the authors\' code is not at ../shared/reference')


def _head():
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    return MODELS.build(
        dict(
            type='DINOHead',
            num_classes=NUM_CLASSES,
            embed_dims=32,
            sync_cls_avg_factor=True,
            loss_cls=dict(type='IABCELoss', alpha=0.25, gamma=2.0),
            loss_bbox=dict(type='L1Loss', loss_weight=5.0),
            loss_iou=dict(type='GIoULoss', loss_weight=2.0),
            train_cfg=dict(
                assigner=dict(
                    type='HungarianAssigner',
                    match_costs=[
                        dict(type='FocalLossCost', weight=2.0),
                        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                        dict(type='IoUCost', iou_mode='giou', weight=2.0)
                    ]))))


def _problem(seed=0):
    """Ground truth (normalised cxcywh) and predictions of 6 layers, the
    encoder and the denoising queries, boxes near the ground truth."""
    gen = torch.Generator().manual_seed(seed)
    gts = []
    for count in NUM_GTS:
        centre = torch.rand(count, 2, generator=gen) * 0.5 + 0.25
        size = torch.rand(count, 2, generator=gen) * 0.3 + 0.15
        gts.append(
            dict(
                boxes=torch.cat([centre, size], 1),
                labels=torch.randint(0, NUM_CLASSES, (count, ),
                                     generator=gen)))

    def boxes(n, layers):
        out = []
        for gt in gts:
            near = gt['boxes'][torch.arange(n) % len(gt['boxes'])]
            noise = torch.randn(layers, n, 4, generator=gen) * 0.05
            out.append((near + noise).clamp(0.05, 0.95))
        return torch.stack(out, 1)  # (layers, bs, n, 4)

    def logits(n, layers):
        return torch.randn(layers, len(gts), n, NUM_CLASSES, generator=gen) * 2

    max_gt = max(NUM_GTS)
    num_dn = DN_GROUPS * 2 * max_gt
    tensors = dict(
        cls=logits(NUM_QUERIES, NUM_LAYERS),
        box=boxes(NUM_QUERIES, NUM_LAYERS),
        enc_cls=logits(NUM_QUERIES, 1)[0],
        enc_box=boxes(NUM_QUERIES, 1)[0],
        dn_cls=logits(num_dn, NUM_LAYERS),
        dn_box=boxes(num_dn, NUM_LAYERS))
    for value in tensors.values():
        value.requires_grad_(True)
    return gts, tensors


def _samples(gts):
    samples = []
    for gt, (h, w) in zip(gts, SHAPES):
        scale = torch.tensor([w, h, w, h], dtype=torch.float)
        samples.append(
            DetDataSample(
                metainfo=dict(img_shape=(h, w)),
                gt_instances=InstanceData(
                    bboxes=bbox_cxcywh_to_xyxy(gt['boxes']) * scale,
                    labels=gt['labels'])))
    return samples


def _our_losses(gts, t, alpha=0.25, **branch_args):
    head = _head()
    head.loss_cls.alpha = alpha
    samples = _samples(gts)
    detector = SimpleNamespace(
        bbox_head=head, encoder_gt_instances=lambda gts: gts)
    branch = AlignDETRBranch(
        NUM_CLASSES, 32, NUM_QUERIES,
        **dict(
            dict(match_numbers=(2, 2, 2, 2, 2, 2, 1), tau=1.5), **branch_args))
    main = SetPredictions(t['cls'], t['box'], torch.zeros(0), [])
    losses = branch.supervise_main(detector, main, samples)
    losses.update(
        branch.supervise_encoder(detector, t['enc_cls'], t['enc_box'],
                                 samples))
    dn = SimpleNamespace(
        meta=dict(
            gt_instances=[s.gt_instances for s in samples],
            dn_meta=dict(
                num_denoising_queries=t['dn_cls'].shape[2],
                num_denoising_groups=DN_GROUPS)))
    targets = DenoisingBranch.targets(head, dn, [s.metainfo for s in samples])
    losses.update(
        layer_loss_dict('dn_',
                        layer_losses(head, t['dn_cls'], t['dn_box'], targets)))
    return losses


def _their_losses(gts, t, monkeypatch):
    criterions, matchers, _ = align_detr_reference.load()
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)

    def layer(cls, box):
        return dict(pred_logits=cls, pred_boxes=box)

    outputs = dict(
        layer(t['cls'][-1], t['box'][-1]),
        aux_outputs=[
            layer(t['cls'][i], t['box'][i]) for i in range(NUM_LAYERS - 1)
        ],
        enc_outputs=layer(t['enc_cls'], t['enc_box']))
    dn = dict(
        layer(t['dn_cls'][-1], t['dn_box'][-1]),
        aux_outputs=[
            layer(t['dn_cls'][i], t['dn_box'][i])
            for i in range(NUM_LAYERS - 1)
        ])
    criterion = criterions.AlignDETRCriterion(
        NUM_CLASSES,
        matchers.MixedMatcher(2.0, 5.0, 2.0, 'focal_loss_cost', 0.25, 2.0), {},
        match_num=[2, 2, 2, 2, 2, 2, 1],
        gamma=2.0,
        alpha=0.25,
        tau=1.5)
    raw = criterion(
        outputs, [dict(g) for g in gts],
        dict(
            output_known_lbs_bboxes=dn,
            dn_num=DN_GROUPS,
            single_padding=2 * max(NUM_GTS)))
    return {
        _our_name(key): value * REF_WEIGHTS[_base(key)]
        for key, value in raw.items()
    }


def _base(key):
    return '_'.join(key.split('_')[:2])


def _our_name(key):
    """``loss_class_dn_3`` -> ``d3.dn_loss_cls``, ``loss_giou_enc`` ->
    ``enc_loss_iou``."""
    base, rest = _base(key), key.split('_')[2:]
    name = OURS[base]
    layer = f'd{rest.pop()}.' if rest and rest[-1].isdigit() else ''
    prefix = ''.join(f'{part}_' for part in rest)
    return f'{layer}{prefix}{name}'


def _tolerance(name):
    """1e-5 relative, but 5e-5 for GIoU terms and box gradients: detrex's
    ``box_iou`` divides by ``union + 1e-6`` of *normalised* boxes (a bias of
    1e-6 / union, about 1e-5 here), mmdet's GIoU loss by the pixel union."""
    return 5e-5 if 'iou' in name or 'box' in name else 1e-5


@needs_reference
def test_losses_and_gradients_equal_the_authors(monkeypatch):
    """Every loss term (6 decoder layers one-to-k / one-to-one, encoder
    proposals, denoising) and the gradients of all predictions equal the
    official criterion's (fp32; tolerances: :func:`_tolerance`)."""
    gts, tensors = _problem()
    ours = _our_losses(gts, tensors)
    again = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in tensors.items()
    }
    theirs = _their_losses(gts, again, monkeypatch)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        torch.testing.assert_close(
            ours[key].reshape(()),
            theirs[key].reshape(()),
            rtol=_tolerance(key),
            atol=0,
            msg=key)
    grads_ours = torch.autograd.grad(
        sum(v.sum() for v in ours.values()), list(tensors.values()))
    grads_theirs = torch.autograd.grad(
        sum(v.sum() for v in theirs.values()), list(again.values()))
    for name, a, b in zip(tensors, grads_ours, grads_theirs):
        assert (a - b).norm() <= _tolerance(name) * b.norm(), name


@needs_reference
@pytest.mark.parametrize('change', ['tau', 'k', 'alpha'])
def test_the_comparison_sees_one_changed_detail(monkeypatch, change):
    """tau 1.5 -> 1.0, the intermediate layers' k 2 -> 3 or alpha 0.25 ->
    0.3 on our side each breaks the equality."""
    gts, tensors = _problem()
    kwargs = dict(tau=1.0) if change == 'tau' else dict(
        match_numbers=(2, 3, 3, 3, 3, 3, 1)) if change == 'k' else {}
    alpha = 0.3 if change == 'alpha' else 0.25
    ours = _our_losses(gts, tensors, alpha=alpha, **kwargs)
    theirs = _their_losses(gts, tensors, monkeypatch)
    worst = max(
        float((ours[k] - theirs[k]).abs().max().detach() /
              theirs[k].abs().max().detach()) for k in ours)
    assert worst > 1e-3


def _dino(branch=True, dn=True):
    cfg = dino_cfg(dims=128, dn=dn)
    cfg['bbox_head']['loss_cls'] = dict(type='IABCELoss')
    if branch:
        cfg['branches'] = [
            dict(type='AlignDETRBranch', match_numbers=(2, 2, 1), tau=1.5)
        ]
    torch.manual_seed(0)
    return build(cfg)


def test_inference_is_the_base_models():
    """Same weights, same predictions: Align-DETR changes training only."""
    ours, base = _dino(), _dino(branch=False)
    base.load_state_dict(ours.state_dict())
    inputs, samples = make_batch()
    for a, b in zip(
            predict(ours, inputs, samples), predict(base, inputs, samples)):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
        assert torch.equal(a.pred_instances.scores, b.pred_instances.scores)


def test_it_replaces_the_main_loss_and_trains():
    """The main keys are the detector's, computed one-to-k (not equal to
    the one-to-one loss of the same model); denoising keeps its keys;
    every loss is finite and reaches the head."""
    model = _dino()
    model.train()
    inputs, samples = make_batch()
    losses = losses_with_seed(model, inputs, samples)
    plain = _dino(branch=False)
    plain.load_state_dict(model.state_dict())
    plain.train()
    base = losses_with_seed(plain, inputs, samples)
    assert sorted(losses) == sorted(base)
    assert not torch.allclose(losses['d0.loss_cls'], base['d0.loss_cls'])
    torch.testing.assert_close(losses['dn_loss_cls'], base['dn_loss_cls'])
    assert all(torch.isfinite(v).all() for v in losses.values())
    sum(losses.values()).backward()
    assert model.bbox_head.cls_branches[0].weight.grad.abs().sum() > 0


def test_two_replacing_branches_are_refused():
    cfg = dino_cfg(dims=128)
    cfg['branches'] = [
        dict(type='AlignDETRBranch', match_numbers=(2, 2, 1)),
        dict(type='AlignDETRBranch', match_numbers=(2, 2, 1))
    ]
    with pytest.raises(ValueError):
        build(cfg)
