"""Stable-DINO against the authors' matcher, criterion and encoder, and as
options of our DINO (see ``projects_detr_plus/models/branches/
stable_dino.py``, ``layers/memory_fusion.py``, ``branches/denoising.py``).
"""
from types import SimpleNamespace

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy
from mmengine.structures import InstanceData
from torch import nn

import stable_dino_reference
from detr_testing import build, dino_cfg, losses_with_seed, make_batch, predict
from projects_detr_plus.models.branches import (DenoisingBranch,
                                                PositionSupervisedLoss,
                                                SetPredictions)
from projects_detr_plus.models.detectors.query_losses import QueryLosses
from projects_detr_plus.models.losses import matched_set_loss

NUM_CLASSES, NUM_QUERIES, NUM_LAYERS = 10, 30, 6
SHAPES = ((96, 128), (80, 112))  # (h, w) per image
NUM_GTS = (3, 4)
DN_GROUPS = 2
# official configs/models/stabledino_r50.py weight_dict
REF_WEIGHTS = dict(
    loss_class=6.0,
    loss_bbox=5.0,
    loss_giou=2.0,
    loss_class_dn=1.0,
    loss_bbox_dn=5.0,
    loss_giou_dn=2.0)
OURS = dict(loss_class='loss_cls', loss_bbox='loss_bbox', loss_giou='loss_iou')

needs_reference = pytest.mark.skipif(
    not stable_dino_reference.available(),
    reason='the authors\' code is not at ../shared/reference')


def _head(class_weight=6.0, beta=0.5, ta_beta=2.0):
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    return MODELS.build(
        dict(
            type='DINOHead',
            num_classes=NUM_CLASSES,
            embed_dims=32,
            sync_cls_avg_factor=True,
            loss_cls=dict(
                type='PositionSupervisedLoss',
                alpha=0.25,
                gamma=2.0,
                ta_alpha=0.0,
                ta_beta=ta_beta,
                loss_weight=class_weight),
            loss_bbox=dict(type='L1Loss', loss_weight=5.0),
            loss_iou=dict(type='GIoULoss', loss_weight=2.0),
            train_cfg=dict(
                assigner=dict(
                    type='HungarianAssigner',
                    match_costs=[
                        dict(
                            type='PositionModulatedFocalCost',
                            weight=2.0,
                            alpha=0.25,
                            gamma=2.0,
                            beta=beta),
                        dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                        dict(type='IoUCost', iou_mode='giou', weight=2.0)
                    ]))))


def _problem(seed=0):
    """Ground truth (normalised cxcywh; labels distinct over the batch) and
    predictions of 6 layers, the encoder and the denoising queries, boxes
    near the ground truth."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randperm(NUM_CLASSES, generator=gen)
    gts, start = [], 0
    for count in NUM_GTS:
        centre = torch.rand(count, 2, generator=gen) * 0.5 + 0.25
        size = torch.rand(count, 2, generator=gen) * 0.3 + 0.15
        gts.append(
            dict(
                boxes=torch.cat([centre, size], 1),
                labels=labels[start:start + count]))
        start += count

    def boxes(n, layers):
        out = []
        for gt in gts:
            near = gt['boxes'][torch.arange(n) % len(gt['boxes'])]
            noise = torch.randn(layers, n, 4, generator=gen) * 0.05
            out.append((near + noise).clamp(0.05, 0.95))
        return torch.stack(out, 1)  # (layers, bs, n, 4)

    def logits(n, layers):
        return torch.randn(layers, len(gts), n, NUM_CLASSES, generator=gen) * 2

    num_dn = DN_GROUPS * 2 * max(NUM_GTS)
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


def _our_losses(gts, t, **head_args):
    """The detector's decoder loss, its encoder loss and the denoising
    branch's, as DINOPlus computes them."""
    head = _head(**head_args)
    samples = _samples(gts)
    metas = [s.metainfo for s in samples]
    instances = [s.gt_instances for s in samples]
    losses = matched_set_loss(head, '', t['cls'], t['box'], instances, metas)
    detector = SimpleNamespace(
        bbox_head=head, encoder_gt_instances=lambda gts: gts)
    losses.update(
        QueryLosses.encoder_loss(detector, t['enc_cls'], t['enc_box'],
                                 instances, metas))
    dn = DenoisingBranch(
        NUM_CLASSES,
        32,
        NUM_QUERIES,
        loss_cls_weight=1.0,
        negative_noise_offset=0.0,
        group_cfg=dict(num_dn_queries=100))
    queries = SimpleNamespace(
        num_queries=t['dn_cls'].shape[2],
        meta=dict(
            gt_instances=instances,
            dn_meta=dict(
                num_denoising_queries=t['dn_cls'].shape[2],
                num_denoising_groups=DN_GROUPS)))
    predictions = SetPredictions(t['dn_cls'], t['dn_box'], torch.zeros(0), [])
    losses.update(dn.loss(detector, predictions, queries, samples))
    return losses


def _official(cec_beta=0.5):
    matcher, criterion, _ = stable_dino_reference.load()
    return criterion.StableDINOCriterion(
        NUM_CLASSES,
        matcher.StableDINOHungarianMatcher(
            cost_class=2.0,
            cost_bbox=5.0,
            cost_giou=2.0,
            cost_class_type='focal_loss_cost',
            alpha=0.25,
            gamma=2.0,
            cec_beta=cec_beta),
        dict(REF_WEIGHTS),
        loss_class_type='focal_loss',
        alpha=0.25,
        gamma=2.0,
        two_stage_binary_cls=False,
        use_ce_loss_type='stable-dino',
        ta_alpha=0.0,
        ta_beta=2.0)


def _layer(cls, box):
    return dict(pred_logits=cls, pred_boxes=box)


def _their_losses(gts, t, monkeypatch):
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: self)
    outputs = dict(
        _layer(t['cls'][-1], t['box'][-1]),
        aux_outputs=[
            _layer(t['cls'][i], t['box'][i]) for i in range(NUM_LAYERS - 1)
        ],
        enc_outputs=_layer(t['enc_cls'], t['enc_box']))
    dn = dict(
        _layer(t['dn_cls'][-1], t['dn_box'][-1]),
        aux_outputs=[
            _layer(t['dn_cls'][i], t['dn_box'][i])
            for i in range(NUM_LAYERS - 1)
        ])
    raw = _official()(outputs, [dict(g) for g in gts],
                      dict(
                          output_known_lbs_bboxes=dn,
                          dn_num=DN_GROUPS,
                          single_padding=2 * max(NUM_GTS)))
    # official modeling/dino.py: weight_dict, its keys + '_enc' and '_{i}'
    return {_our_name(key): value * _weight(key) for key, value in raw.items()}


def _weight(key):
    parts = key.split('_')
    base = '_'.join(
        parts[:3] if len(parts) > 2 and parts[2] == 'dn' else parts[:2])
    return REF_WEIGHTS[base]


def _our_name(key):
    """``loss_class_dn_3`` -> ``d3.dn_loss_cls``, ``loss_giou_enc`` ->
    ``enc_loss_iou``."""
    parts = key.split('_')
    base, rest = '_'.join(parts[:2]), parts[2:]
    layer = f'd{rest.pop()}.' if rest and rest[-1].isdigit() else ''
    prefix = ''.join(f'{part}_' for part in rest)
    return f'{layer}{prefix}{OURS[base]}'


def _official_batch_coupling_is_harmless(gts, t):
    """The official matcher rescales an image's ``u`` by its maximum over
    every ground truth of the batch; with distinct labels that equals ours
    when no image's queries overlap another image's ground truth better
    than their own."""
    from mmdet.structures.bbox import bbox_overlaps
    boxes = [t['box'][i] for i in range(NUM_LAYERS)] + [t['enc_box']]
    assert len(torch.cat([g['labels'] for g in gts]).unique()) == sum(NUM_GTS)
    for layer_boxes in boxes:  # (bs, n, 4)
        for image, pred in enumerate(layer_boxes):
            giou = [
                bbox_overlaps(
                    bbox_cxcywh_to_xyxy(pred.detach()),
                    bbox_cxcywh_to_xyxy(g['boxes']),
                    mode='giou').max() for g in gts
            ]
            if giou[image] < max(giou):
                return False
    return True


def _tolerance(name):
    """1e-5 relative, but 5e-5 for GIoU terms and box gradients: detrex's
    ``generalized_box_iou`` divides by ``union + 1e-6`` of *normalised*
    boxes (a bias of 1e-6 / union, about 1e-5 here), mmdet's GIoU loss by
    the pixel union.  (The classification targets' IoUs carry the same
    bias, but the per-image rescaling all but cancels it: 4e-7 at most.)"""
    return 5e-5 if 'iou' in name or name in ('box', 'enc_box',
                                             'dn_box') else 1e-5


def _compare(gts, tensors, monkeypatch, **ours_args):
    ours = _our_losses(gts, tensors, **ours_args)
    again = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in tensors.items()
    }
    theirs = _their_losses(gts, again, monkeypatch)
    return ours, theirs, again


@needs_reference
def test_losses_and_gradients_equal_the_authors(monkeypatch):
    """Every loss term (6 decoder layers, encoder proposals, denoising) and
    the gradients of all predictions equal the official criterion's (fp32;
    tolerances: :func:`_tolerance`), on a batch of 2 whose labels are
    distinct, where the official batch coupling changes nothing
    (asserted)."""
    gts, tensors = _problem()
    assert _official_batch_coupling_is_harmless(gts, tensors)
    ours, theirs, again = _compare(gts, tensors, monkeypatch)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 3 * (2 * NUM_LAYERS + 1)
    worst = {}
    for key in ours:
        a, b = ours[key].reshape(()), theirs[key].reshape(())
        worst[key] = float((a - b).abs().detach() / b.abs().detach())
        torch.testing.assert_close(a, b, rtol=_tolerance(key), atol=0, msg=key)
    grads_ours = torch.autograd.grad(
        sum(v.sum() for v in ours.values()), list(tensors.values()))
    grads_theirs = torch.autograd.grad(
        sum(v.sum() for v in theirs.values()), list(again.values()))
    for name, a, b in zip(tensors, grads_ours, grads_theirs):
        worst[name] = float((a - b).norm() / b.norm())
        assert (a - b).norm() <= _tolerance(name) * b.norm(), name
    print('largest relative differences:',
          sorted(worst.items(), key=lambda kv: -kv[1])[:6])


@needs_reference
def test_matching_equals_the_authors():
    """Every decoder layer's and the encoder's matching (query, ground
    truth) pairs equal the official matcher's."""
    gts, tensors = _problem()
    assert _official_batch_coupling_is_harmless(gts, tensors)
    head, matcher = _head(), _official().matcher
    samples = _samples(gts)
    sets = [(tensors['cls'][i], tensors['box'][i]) for i in range(NUM_LAYERS)]
    sets.append((tensors['enc_cls'], tensors['enc_box']))
    for cls, box in sets:
        cls, box = cls.detach(), box.detach()
        theirs = matcher(_layer(cls, box), [dict(g) for g in gts])
        for image, (sample, (rows, cols)) in enumerate(zip(samples, theirs)):
            h, w = sample.img_shape
            pred = InstanceData(
                scores=cls[image],
                bboxes=bbox_cxcywh_to_xyxy(box[image]) *
                box.new_tensor([w, h, w, h]))
            gt_inds = head.assigner.assign(pred, sample.gt_instances,
                                           sample.metainfo).gt_inds
            ours = {(int(q), int(g) - 1)
                    for q, g in enumerate(gt_inds) if g > 0}
            assert ours == set(zip(rows.tolist(), cols.tolist()))


@needs_reference
@pytest.mark.parametrize('change',
                         ['class_weight', 'ta_beta', 'beta', 'no_rescale'])
def test_the_comparison_sees_one_changed_detail(monkeypatch, change):
    """On our side: the class weight 6 -> 5, the target's IoU exponent
    2 -> 1, the cost's beta 0.5 -> 0 (plain focal cost) or the targets
    not rescaled per image each breaks the equality."""
    gts, tensors = _problem()
    kwargs = dict(
        class_weight=dict(class_weight=5.0),
        ta_beta=dict(ta_beta=1.0),
        beta=dict(beta=0.0)).get(change, {})
    if change == 'no_rescale':
        monkeypatch.setattr(PositionSupervisedLoss, 'image_target',
                            lambda self, quality, image: quality)
    ours, theirs, _ = _compare(gts, tensors, monkeypatch, **kwargs)
    worst = max(
        float((ours[k] - theirs[k]).abs().max().detach() /
              theirs[k].abs().max().detach()) for k in ours)
    assert worst > 1e-3


@needs_reference
def test_same_class_ground_truths_get_their_own_giou(monkeypatch):
    """The documented difference: two ground truths of one class.  Our
    cost of each is the focal cost of ``p * u ** 0.5`` with its own ``u``
    (a hand computation); the official matcher gives both the last one's
    ``u`` (one shared column, rescaled by its own maximum)."""
    from mmdet.structures.bbox import bbox_overlaps
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 8, NUM_CLASSES, generator=gen)
    centres = torch.rand(1, 8, 2, generator=gen) * 0.4 + 0.3
    boxes = torch.cat([centres, torch.full_like(centres, 0.2)], -1)
    gt = dict(
        boxes=torch.tensor([[0.4, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.2]]),
        labels=torch.tensor([2, 2]))
    xyxy = bbox_cxcywh_to_xyxy(boxes[0])
    gt_xyxy = bbox_cxcywh_to_xyxy(gt['boxes'])
    ours = _head().assigner.match_costs[0](InstanceData(
        scores=logits[0],
        bboxes=xyxy), InstanceData(bboxes=gt_xyxy, labels=gt['labels']))

    def focal_cost(u):  # u: (GIoU + 1) / 2 of each column, unscaled
        u = u * max(1 / (float(u.max()) + 1e-8), 1)
        p = logits[0].sigmoid()[:, [2, 2]] * u.sqrt()
        return 2.0 * (0.25 * (1 - p)**2 * -(p + 1e-8).log() -
                      0.75 * p**2 * -(1 - p + 1e-8).log())

    u = (bbox_overlaps(xyxy, gt_xyxy, mode='giou') + 1) / 2
    torch.testing.assert_close(ours, focal_cost(u), rtol=1e-5, atol=1e-6)
    module = stable_dino_reference.load()[0]
    captured = []
    real = module.linear_sum_assignment
    monkeypatch.setattr(module, 'linear_sum_assignment',
                        lambda c: captured.append(c) or real(c))
    module.StableDINOHungarianMatcher(
        2.0, 0.0, 0.0, 'focal_loss_cost', 0.25, 2.0,
        cec_beta=0.5)(_layer(logits, boxes), [gt])
    theirs = torch.as_tensor(captured[0])
    torch.testing.assert_close(
        theirs, focal_cost(u[:, [1, 1]]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs[:, 0], ours[:, 0], rtol=1e-3)


@needs_reference
def test_memory_fusion_equals_the_authors():
    """Our ``DenseFusionEncoder`` equals the official
    ``StableDINOTransformerEncoder(multi_level_fusion='dense-fusion')``
    run on the same (our) encoder layers with the same fusion weights."""
    from projects_detr_plus.models.layers import DenseFusionEncoder
    _, _, transformer = stable_dino_reference.load()
    dims, levels, shapes = 32, 2, [(6, 8), (3, 4)]
    torch.manual_seed(0)
    ours = DenseFusionEncoder(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=dict(
                embed_dims=dims, num_levels=levels, dropout=0.0),
            ffn_cfg=dict(
                embed_dims=dims, feedforward_channels=64, ffn_drop=0.0)))
    theirs = transformer.StableDINOTransformerEncoder(
        embed_dim=dims,
        num_layers=3,
        num_feature_levels=levels,
        post_norm=False,
        multi_level_fusion='dense-fusion')
    assert torch.equal(theirs.fusion_layer[0].bias,
                       ours.fusion_layer[0].bias)  # both 0
    theirs.fusion_layer.load_state_dict(ours.fusion_layer.state_dict())
    theirs.layers = nn.ModuleList(
        _OfficialCall(layer) for layer in ours.layers)
    spatial = torch.tensor(shapes)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    tokens = int(spatial.prod(1).sum())
    query, pos = torch.randn(2, tokens, dims), torch.randn(2, tokens, dims)
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    ratios = torch.ones(2, levels, 2)
    args = dict(
        spatial_shapes=spatial, level_start_index=start, valid_ratios=ratios)
    with torch.no_grad():
        fused = ours(query=query, query_pos=pos, key_padding_mask=mask, **args)
        official = theirs(
            query,
            None,
            None,
            query_pos=pos,
            query_key_padding_mask=mask,
            reference_points=ours.get_encoder_reference_points(
                spatial, ratios, device=query.device),
            **args)
    assert torch.equal(fused, official)


class _OfficialCall(nn.Module):
    """One of our encoder layers called the way detrex calls its own."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self,
                query,
                key,
                value,
                query_pos=None,
                attn_masks=None,
                query_key_padding_mask=None,
                key_padding_mask=None,
                **kwargs):
        return self.layer(
            query=query,
            query_pos=query_pos,
            key_padding_mask=query_key_padding_mask,
            **kwargs)


def _stable_cfg(fusion=True, dims=128):
    cfg = dino_cfg(dims=dims)
    if fusion:
        cfg['encoder']['type'] = 'DenseFusionEncoder'
    cfg['bbox_head']['loss_cls'] = dict(
        type='PositionSupervisedLoss', loss_weight=6.0)
    cfg['dn_cfg'].update(negative_noise_offset=0.0, loss_cls_weight=1.0)
    cfg['train_cfg']['assigner']['match_costs'][0] = dict(
        type='PositionModulatedFocalCost', weight=2.0, beta=0.5)
    return cfg


def test_without_the_options_dino_is_unchanged():
    """No encoder ``type``: mmdet's DINO keys; naming our default encoder
    changes nothing; the fusion adds exactly its 4 keys."""
    torch.manual_seed(0)
    plain = build(dino_cfg(dims=128))
    cfg = dino_cfg(dims=128)
    cfg['encoder']['type'] = 'DeformableEncoderPlus'
    typed = build(cfg)
    typed.load_state_dict(plain.state_dict())
    inputs, samples = make_batch()
    for a, b in zip(
            predict(plain, inputs, samples), predict(typed, inputs, samples)):
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a.pred_instances[key], b.pred_instances[key])
    mmdet_keys = set(build(dino_cfg(plus=False)).state_dict())
    assert set(build(dino_cfg()).state_dict()) == mmdet_keys
    fused = set(build(_stable_cfg()).state_dict())
    assert fused - set(plain.state_dict()) == {
        f'encoder.fusion_layer.{i}.{p}'
        for i in (0, 1)
        for p in ('weight', 'bias')
    }
    assert set(plain.state_dict()) <= fused


def test_the_fused_memory_is_the_memory_and_it_trains():
    """Query selection and the decoder get the fusion's output; every
    Stable-DINO loss is finite and trains the fusion layer."""
    model = build(_stable_cfg())
    model.train()
    captured = {}
    model.encoder.fusion_layer.register_forward_hook(
        lambda module, args, out: captured.update(fused=out))
    original = model.pre_decoder

    def pre_decoder(memory, *args, **kwargs):
        captured['memory'] = memory
        return original(memory, *args, **kwargs)

    model.pre_decoder = pre_decoder
    inputs, samples = make_batch()
    losses = losses_with_seed(model, inputs, samples)
    assert captured['memory'] is captured['fused']
    assert all(torch.isfinite(v).all() for v in losses.values())
    sum(losses.values()).backward()
    assert model.encoder.fusion_layer[0].weight.grad.abs().sum() > 0


def test_denoising_negatives_without_the_offset():
    """``negative_noise_offset=0``: the same random draws as mmdet's
    generator; positives unchanged, negatives noised like positives (inside
    the box's half-size), not pushed out by one."""
    common = dict(
        num_classes=NUM_CLASSES,
        embed_dims=32,
        num_matching_queries=NUM_QUERIES,
        group_cfg=dict(num_dn_queries=100))
    gt = torch.tensor([[0.2, 0.2, 0.6, 0.5], [0.3, 0.4, 0.9, 0.8]])
    queries = {}
    for offset in (1.0, 0.0):
        torch.manual_seed(0)
        branch = DenoisingBranch(negative_noise_offset=offset, **common)
        queries[offset] = branch.generate_dn_bbox_query(gt, 3).sigmoid()
    groups = torch.arange(len(queries[0.0])) // len(gt) % 2
    pos, neg = groups == 0, groups == 1
    torch.testing.assert_close(
        queries[0.0][pos], queries[1.0][pos], rtol=0, atol=0)
    assert not torch.allclose(queries[0.0][neg], queries[1.0][neg])
    noised = bbox_cxcywh_to_xyxy(queries[0.0])
    half = (gt[:, 2:] - gt[:, :2]).repeat(1, 2).repeat(6, 1) / 2
    assert ((noised - gt.repeat(6, 1)).abs() <= half + 1e-3).all()
