"""Co-DINO: auxiliary one-to-many heads and customized positive queries."""
import copy
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config

from conftest import REPO_ROOT
from detr_testing import (assert_same_predictions, build, decode,
                          deformable_detr_cfg, dino_cfg, losses_with_seed,
                          make_batch, parameters_without_grad, predict)

SHAPES = Config.fromfile(
    osp.join(REPO_ROOT, 'configs/shapes/co-dino-tiny_shapes.py'))
FCOS = dict(
    type='CoFCOSHead',
    in_channels=128,
    feat_channels=128,
    stacked_convs=1,
    strides=[8, 16, 32, 64, 128],
    regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 128), (128, 1e8)),
    center_sampling=True,
    center_sample_radius=1.5,
    norm_on_bbox=True,
    centerness_on_reg=True,
    loss_cls=dict(
        type='FocalLoss',
        use_sigmoid=True,
        gamma=2.0,
        alpha=0.25,
        loss_weight=1.0),
    loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
    loss_centerness=dict(
        type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0))


def branch(name, head, **kwargs):
    return dict(
        type='CollaborativeBranch',
        name=name,
        aux_head=copy.deepcopy(head),
        **kwargs)


ALL_BRANCHES = (branch('co_atss', SHAPES.atss_head.to_dict()),
                branch('co_rcnn',
                       SHAPES.rcnn_head.to_dict()), branch('co_fcos', FCOS))


def co_dino(branches=ALL_BRANCHES, dn=True):
    torch.manual_seed(0)
    model = build(dino_cfg(dims=128, dn=dn, branches=branches))
    model.train()
    return model


def assert_predicts_like_base(model, base):
    """``base`` (the detector without the Co-DETR branches) loads every
    weight of ``model`` but the branches' and the shared extra level, and
    predicts bit-identically."""
    missing, unexpected = base.load_state_dict(
        model.state_dict(), strict=False)
    assert not missing and unexpected and all(
        k.startswith(('extra_branches.', 'encoder_extra_level.'))
        for k in unexpected)
    assert_same_predictions(model, base, seed=3)


def _encoder_outputs(model, inputs, samples):
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=copy.deepcopy(samples)),
        training=True)
    feats = model.extract_feat(data['inputs'])
    encoder_inputs, _ = model.pre_transformer(feats, data['data_samples'])
    memory = model.forward_encoder(**encoder_inputs)['memory']
    return memory, encoder_inputs['spatial_shapes'], data['data_samples']


@pytest.fixture(scope='module')
def model():
    return co_dino()


@pytest.fixture(scope='module')
def pyramid(model):
    from projects_detr_plus.models.layers.pyramid import encoder_pyramid
    memory, shapes, samples = _encoder_outputs(
        model, *make_batch(num_gts=(3, 6), size=128))
    feats = encoder_pyramid(memory, shapes, model.encoder_extra_level)
    return feats, samples


def _positives(candidates, num_classes):
    return [c[c.labels < num_classes] for c in candidates]


def test_pyramid_is_the_encoder_memory_per_level(model, pyramid):
    feats, _ = pyramid
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2, 1]
    memory, shapes, _ = _encoder_outputs(model,
                                         *make_batch(num_gts=(3, 6), size=128))
    first = int(shapes[0][0] * shapes[0][1])
    torch.testing.assert_close(feats[0].flatten(2).transpose(1, 2),
                               memory[:, :first])


def test_atss_positives_equal_mmdet_assignment(model, pyramid):
    from mmdet.models.task_modules import ATSSAssigner
    from mmengine.structures import InstanceData
    feats, samples = pyramid
    head = model.extra_branches[0].aux_head
    _, candidates = head.loss_and_candidates(feats, samples)
    sizes = [f.shape[-2:] for f in feats]
    anchors = head.prior_generator.grid_priors(sizes, device='cpu')
    assigner = ATSSAssigner(topk=9)
    for sample, cand in zip(samples, candidates):
        # every anchor is a candidate; the unmatched ones are background
        torch.testing.assert_close(cand.priors, torch.cat(anchors))
        pos = cand[cand.labels < head.num_classes]
        assert (cand.labels <= head.num_classes).all()
        gt = sample.gt_instances
        result = assigner.assign(
            InstanceData(priors=torch.cat(anchors)), [len(a) for a in anchors],
            gt)
        matched = result.gt_inds > 0
        assert matched.any()
        torch.testing.assert_close(pos.priors, torch.cat(anchors)[matched])
        torch.testing.assert_close(pos.bboxes,
                                   gt.bboxes[result.gt_inds[matched] - 1])
        assert torch.equal(pos.labels, gt.labels[result.gt_inds[matched] - 1])


def test_fcos_positives_are_points_inside_their_boxes(model, pyramid):
    feats, samples = pyramid
    head = model.extra_branches[2].aux_head
    losses, candidates = head.loss_and_candidates(feats, samples)
    positives = _positives(candidates, head.num_classes)
    assert sum(len(c) for c in candidates) == 2 * sum(f.shape[-2] * f.shape[-1]
                                                      for f in feats)
    assert {'loss_cls', 'loss_bbox', 'loss_centerness'} <= set(losses)
    for sample, pos in zip(samples, positives):
        gt = sample.gt_instances
        assert len(pos) > 0
        centres = (pos.priors[:, :2] + pos.priors[:, 2:]) / 2
        inside = ((centres >= pos.bboxes[:, :2] - 1e-3) &
                  (centres <= pos.bboxes[:, 2:] + 1e-3)).all(1)
        assert inside.all()
        # each target box is one of the image's gt boxes, with its label
        ious = torch.cdist(pos.bboxes, gt.bboxes)
        nearest = ious.argmin(1)
        assert torch.allclose(pos.bboxes, gt.bboxes[nearest], atol=1e-3)
        assert torch.equal(pos.labels, gt.labels[nearest])


def test_rcnn_positives_overlap_their_targets(model, pyramid):
    from mmdet.structures.bbox import bbox_overlaps
    feats, samples = pyramid
    head = model.extra_branches[1].aux_head
    losses, candidates = head.loss_and_candidates(feats, samples)
    assert {'loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls',
            'loss_bbox'} <= set(losses)
    for sample, cand in zip(samples, candidates):
        # the sampled proposals: positives first, then background
        assert len(cand) <= 512  # the rcnn sampler's num
        is_pos = cand.labels < head.num_classes
        assert is_pos.any() and (~is_pos).any()
        assert not is_pos[is_pos.int().argmin():].any()
        assert (cand.labels[~is_pos] == head.num_classes).all()
        pos = cand[is_pos]
        assert len(pos) > 0
        ious = bbox_overlaps(pos.priors, pos.bboxes, is_aligned=True)
        assert (ious >= 0.5 - 1e-4).all()  # rcnn pos_iou_thr
        gt = sample.gt_instances
        match = (pos.bboxes[:, None] == gt.bboxes[None]).all(-1)
        assert match.any(1).all()
        assert torch.equal(pos.labels, gt.labels[match.int().argmax(1)])


def _queries(model, branch_index, num_gts, seed=0):
    """A branch's queries and, drawn with the same seed, its head's
    candidates."""
    from projects_detr_plus.models.layers.pyramid import encoder_pyramid
    inputs, samples = make_batch(num_gts=num_gts, size=128)
    memory, shapes, data_samples = _encoder_outputs(model, inputs, samples)
    feats = encoder_pyramid(memory, shapes, model.encoder_extra_level)
    branch_module = model.extra_branches[branch_index]
    torch.manual_seed(seed)
    queries = branch_module.make_queries(
        None, SimpleNamespace(encoder_pyramid=feats), model, data_samples)
    torch.manual_seed(seed)
    _, candidates = branch_module.aux_head.loss_and_candidates(
        feats, data_samples)
    return queries, candidates, data_samples


def _as_xyxy(cxcywh, scale):
    cxcywh = cxcywh * scale
    return torch.cat(
        [cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2],
        1)


def test_positive_queries_carry_their_targets(model):
    queries, candidates, samples = _queries(model, 0, (3, 6))
    num_classes = model.bbox_head.num_classes
    positives = _positives(candidates, num_classes)
    meta = queries.meta
    assert queries.num_queries == max(9, max(len(p) for p in positives))
    assert not queries.sees_main
    for i, (pos, sample) in enumerate(zip(positives, samples)):
        n = len(pos)
        h, w = sample.img_shape
        scale = torch.tensor([w, h, w, h], dtype=torch.float)
        assert meta['bbox_weights'][i, :n].eq(1).all()
        assert meta['bbox_weights'][i, n:].eq(0).all()
        torch.testing.assert_close(
            _as_xyxy(meta['bbox_targets'][i, :n], scale),
            pos.bboxes,
            atol=1e-3,
            rtol=1e-4)
        assert torch.equal(meta['labels'][i, :n], pos.labels)
        anchors = queries.reference[i, :n].sigmoid() * scale
        centres = (pos.priors[:, :2] + pos.priors[:, 2:]) / 2
        torch.testing.assert_close(
            anchors[:, :2],
            centres.clamp(min=0, max=128),
            atol=1e-2,
            rtol=1e-3)


def test_padding_with_random_negatives_of_the_same_head(model):
    """Official ``get_aux_targets``: at least 9 queries per image, the
    positives padded with the head's negatives, trained as background (box
    weight 0) and visible to the branch's other queries."""
    num_classes = model.bbox_head.num_classes
    for num_gts in ((1, 0), (0, 0)):
        queries, candidates, samples = _queries(model, 0, num_gts)
        meta = queries.meta
        assert queries.num_queries >= 9
        assert not queries.padding.any()  # enough negatives: no padding
        assert meta['label_weights'].eq(1).all()
        for i, (cand, sample) in enumerate(zip(candidates, samples)):
            n_pos = int((cand.labels < num_classes).sum())
            negatives = cand[cand.labels == num_classes]
            assert meta['bbox_weights'][i].sum() == n_pos
            assert (meta['labels'][i, n_pos:] == num_classes).all()
            h, w = sample.img_shape
            scale = torch.tensor([w, h], dtype=torch.float)
            boxes = queries.reference[i, n_pos:].sigmoid()
            # each padding query sits on one of the head's negative anchors
            centres = (negatives.priors[:, :2] + negatives.priors[:, 2:]) / 2
            dist = torch.cdist(boxes[:, :2], (centres / scale).clamp(0, 1))
            assert dist.min(1).values.max() < 1e-3
        assert len(set(map(tuple, queries.reference[0].tolist()))) == \
            queries.num_queries  # distinct anchors


def test_zero_padding_option_masks_padding_queries():
    model = co_dino(
        branches=(branch(
            'co_atss', SHAPES.atss_head.to_dict(), zero_padding=True), ))
    queries, candidates, _ = _queries(model, 0, (1, 0))
    meta = queries.meta
    assert queries.num_queries == 9
    n_pos = int((candidates[0].labels < model.bbox_head.num_classes).sum())
    assert meta['label_weights'][0].sum() == n_pos
    assert meta['label_weights'][1].sum() == 0
    assert torch.equal(queries.padding, meta['label_weights'] == 0)


def fixed_target_loss(head,
                      prefix,
                      cls,
                      boxes,
                      labels,
                      targets,
                      weights,
                      metas,
                      bbox_weights=None):
    """The core's loss of fixed targets, every layer, named."""
    from projects_detr_plus.models.losses import (fixed_targets,
                                                  layer_loss_dict,
                                                  layer_losses)
    fixed = fixed_targets(labels, targets, weights,
                          weights if bbox_weights is None else bbox_weights,
                          metas, head.num_classes)
    return layer_loss_dict(prefix, layer_losses(head, cls, boxes, fixed))


def test_negatives_add_classification_terms_only(model):
    """Padding negatives change the classification loss, not the box
    losses, and every loss is normalised by the number of positives."""
    head = model.bbox_head
    bg = head.num_classes
    torch.manual_seed(0)
    cls = torch.randn(2, 1, 4, head.num_classes)
    boxes = torch.rand(2, 1, 4, 4) * 0.3 + 0.3
    targets = torch.rand(1, 4, 4) * 0.3 + 0.3
    labels = torch.tensor([[1, 2, 0, 0]])
    metas = [dict(img_shape=(100, 80))]
    only_pos = fixed_target_loss(head, '', cls[:, :, :2], boxes[:, :, :2],
                                 labels[:, :2], targets[:, :2],
                                 torch.ones(1, 2), metas)
    with_neg = fixed_target_loss(
        head,
        '',
        cls,
        boxes,
        labels.new_tensor([[1, 2, bg, bg]]),
        targets,
        torch.ones(1, 4),
        metas,
        bbox_weights=torch.tensor([[1., 1, 0, 0]]))
    for key in ('loss_bbox', 'loss_iou'):
        torch.testing.assert_close(with_neg[key], only_pos[key])
    assert with_neg['loss_cls'] > only_pos['loss_cls']
    # 2 positives: the classification sum over 4 queries divided by 2
    per_query = fixed_target_loss(
        head,
        '',
        cls,
        boxes,
        labels.new_tensor([[1, 2, bg, bg]]),
        targets,
        torch.ones(1, 4),
        metas,
        bbox_weights=torch.ones(1, 4))
    assert per_query['loss_iou'] != with_neg['loss_iou']


def test_at_most_max_queries_per_image():
    model = co_dino(
        branches=(branch(
            'co_atss',
            SHAPES.atss_head.to_dict(),
            max_queries=5,
            min_queries=5), ))
    queries, candidates, _ = _queries(model, 0, (8, 6))
    assert queries.num_queries == 5
    assert queries.meta['bbox_weights'].sum() == 10
    with pytest.raises(ValueError, match='min_queries <= max_queries'):
        co_dino(
            branches=(branch(
                'co_atss',
                SHAPES.atss_head.to_dict(),
                max_queries=5,
                min_queries=9), ))


def test_perturbing_positive_queries_leaves_main_bit_identical():
    model = co_dino()
    inputs, samples = make_batch(num_gts=(3, 6), size=128)
    clean = decode(model, inputs, samples)
    with torch.no_grad():
        for b in model.extra_branches:
            b.content[0].weight.add_(torch.randn_like(b.content[0].weight))
    noisy = decode(model, inputs, samples)
    names = [p.name for p in clean['query_sets']]
    sizes = [p.num_queries for p in clean['query_sets']]
    main_end = sizes[0] + sizes[names.index('dn')]
    co_start = sum(sizes[:names.index('co_atss')])
    assert torch.equal(clean['hidden_states'][:, :, :main_end],
                       noisy['hidden_states'][:, :, :main_end])
    assert not torch.equal(clean['hidden_states'][:, :, co_start:],
                           noisy['hidden_states'][:, :, co_start:])


def test_losses_of_every_branch_and_head(model):
    losses = losses_with_seed(model, *make_batch(num_gts=(3, 6), size=128))
    for name in ('co_atss', 'co_rcnn', 'co_fcos'):
        for key in ('loss_cls', 'loss_bbox', 'loss_iou'):
            assert losses[f'{name}_{key}'] > 0
            assert f'd0.{name}_{key}' in losses
    assert sum(losses['co_atss.loss_centerness']) > 0
    assert sum(losses['co_rcnn.loss_rpn_cls']) > 0
    for key, value in losses.items():
        values = value if isinstance(value, list) else [value]
        assert all(torch.isfinite(v) for v in values), key


def test_empty_ground_truth_in_every_head():
    model = co_dino()
    model.zero_grad(set_to_none=True)
    losses = losses_with_seed(model, *make_batch(num_gts=(0, 0), size=128))
    total = sum(
        sum(v) if isinstance(v, list) else v for k, v in losses.items()
        if 'loss' in k)
    assert torch.isfinite(total) and total > 0
    total.backward()
    assert not parameters_without_grad(model)


def test_predict_equals_plain_dino_with_the_same_weights():
    model = co_dino()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = model.data_preprocessor(
        dict(zip(('inputs', 'data_samples'), make_batch(size=128))), True)
    losses = model.loss(data['inputs'], data['data_samples'])
    optimizer.zero_grad()
    model.parse_losses(losses)[0].backward()
    optimizer.step()
    assert_predicts_like_base(model, build(dino_cfg(dims=128)))


def test_every_kind_of_branch_combines_in_one_model():
    """Denoising + group + hybrid + collaborative, from config alone."""
    branches = (dict(type='GroupQueryBranch', num_groups=2),
                dict(
                    type='HybridMatchingBranch',
                    num_queries=40,
                    k_one_to_many=2),
                branch('co_atss', SHAPES.atss_head.to_dict()))
    torch.manual_seed(0)
    model = build(
        dino_cfg(
            dims=128, branches=branches, assigner='GroupOneToOneAssigner'))
    model.train()
    losses = losses_with_seed(model, *make_batch(num_gts=(3, 6), size=128))
    for prefix in ('dn_', 'group_', 'hybrid_', 'co_atss_'):
        assert losses[f'{prefix}loss_iou'] > 0, prefix
    model.parse_losses(losses)[0].backward()
    assert all(p.grad is not None for p in model.parameters()
               if p.requires_grad)


def _predictions(model, test_cfg):
    model.test_cfg = model.bbox_head.test_cfg = test_cfg
    inputs, samples = make_batch(seed=3, size=128)
    return [s.pred_instances for s in predict(model, inputs, samples)]


def test_test_time_nms_option():
    """``test_cfg.nms`` (official Co-DINO: soft-NMS 0.8 on the top 300):
    hard NMS leaves no pair above its threshold; soft-NMS keeps
    boxes of the NMS-free output with decayed scores, best first."""
    from mmdet.structures.bbox import bbox_overlaps
    model = co_dino()
    model.eval()
    free = _predictions(model, dict(max_per_img=50))
    hard = _predictions(
        model,
        dict(
            max_per_img=50,
            nms=dict(type='nms', iou_threshold=0.5, class_agnostic=True)))
    soft = _predictions(
        model,
        dict(max_per_img=20, nms=dict(type='soft_nms', iou_threshold=0.8)))
    for f, h, s in zip(free, hard, soft):
        assert len(f) == 50 and 0 < len(h) < 50 and len(s) == 20
        ious = bbox_overlaps(h.bboxes, h.bboxes)
        ious.fill_diagonal_(0)
        assert ious.max() <= 0.5
        assert torch.equal(s.scores, s.scores.sort(descending=True).values)
        in_free = (s.bboxes[:, None] == f.bboxes[None]).all(-1)
        assert in_free.any(1).all()
        original = f.scores[in_free.int().argmax(1)]
        assert (s.scores <= original + 1e-6).all()


def test_content_init_option():

    def content(init):
        torch.manual_seed(0)
        model = build(dict(dino_cfg(dims=128), content_init=init))
        model.init_weights()
        return model.query_embedding.weight

    assert abs(content('normal').std().item() - 1.0) < 0.05
    assert content('xavier_uniform').abs().max() < 0.5
    with pytest.raises(ValueError, match='content_init'):
        content('uniform')


# Co-Deformable-DETR: the same heads at the tiny Deformable DETR's width
def _at_width(cfg, dims):
    if isinstance(cfg, dict):
        return {
            k:
            dims if k in ('in_channels', 'feat_channels',
                          'out_channels') else _at_width(v, dims)
            for k, v in cfg.items()
        }
    return cfg


CO_DEFORMABLE = dict(
    type='CollaborativeBranch',
    own_query_pos=True,
    coord_feat=True,
    head_embedding='scalar')


def co_deformable_detr(branches=('rcnn', 'atss'), seed=0):
    heads = dict(
        rcnn=SHAPES.rcnn_head.to_dict(), atss=SHAPES.atss_head.to_dict())
    torch.manual_seed(seed)
    model = build(
        deformable_detr_cfg(
            refine=True,
            two_stage=True,
            mixed_selection=True,
            look_forward_twice=True,
            branches=[
                dict(
                    CO_DEFORMABLE,
                    name=f'co_{b}',
                    aux_head=_at_width(heads[b], 256)) for b in branches
            ]))
    model.train()
    return model


def _states(model, inputs, samples):
    out = decode(model, inputs, samples)
    sizes = [p.num_queries for p in out['query_sets']]
    return out['hidden_states'], sizes


@pytest.mark.parametrize(
    'perturbed', ['content.0.weight', 'feat_proj.0.weight', 'head_embedding'])
def test_co_deformable_queries_use_position_feature_and_head_embedding(
        perturbed):
    """Each part of the official query construction reaches the decoder
    (the head embedding only through the queries' own ``query_pos``), and
    never the main queries."""
    model = co_deformable_detr(branches=('atss', ))
    inputs, samples = make_batch(num_gts=(3, 6), size=128)
    clean, sizes = _states(model, inputs, samples)
    with torch.no_grad():
        param = dict(model.extra_branches[0].named_parameters())[perturbed]
        param.add_(torch.randn_like(param))
    noisy, _ = _states(model, inputs, samples)
    main = sizes[0]
    assert torch.equal(clean[:, :, :main], noisy[:, :, :main])
    assert not torch.allclose(clean[:, :, main:], noisy[:, :, main:])


def test_co_deformable_detr_trains_every_part_and_predicts_like_its_base():
    model = co_deformable_detr()
    model.zero_grad(set_to_none=True)
    losses = losses_with_seed(model, *make_batch(num_gts=(3, 0), size=128))
    for name in ('co_rcnn', 'co_atss'):
        for key in ('loss_cls', 'loss_bbox', 'loss_iou'):
            assert torch.isfinite(losses[f'{name}_{key}'])
            assert losses[f'{name}_{key}'] > 0
    model.parse_losses(losses)[0].backward()
    assert not parameters_without_grad(model)
    assert_predicts_like_base(
        model,
        build(
            deformable_detr_cfg(
                refine=True,
                two_stage=True,
                mixed_selection=True,
                look_forward_twice=True)))


def test_co_deformable_options_are_checked():
    with pytest.raises(ValueError, match='set own_query_pos'):
        co_dino(
            branches=(branch(
                'co_atss', SHAPES.atss_head.to_dict(),
                head_embedding='scalar'), ))
    with pytest.raises(ValueError, match="head_embedding must be"):
        co_dino(
            branches=(branch(
                'co_atss',
                SHAPES.atss_head.to_dict(),
                own_query_pos=True,
                head_embedding='x'), ))
    model = co_dino(
        branches=(branch(
            'co_atss', SHAPES.atss_head.to_dict(), own_query_pos=True), ))
    with pytest.raises(ValueError, match='bring query_pos'):
        losses_with_seed(model, *make_batch(size=128))
