"""Group DETR supervision against the authors' code.

There is no runnable official Group-DINO here (PaddleDetection is
PaddlePaddle), so the comparison has three parts:

1. **Run against LW-DETR** (Atten4Vis/LW-DETR, the Group DETR authors'
   PyTorch code, ``../shared/reference/atten4vis-lw-detr``; no model is
   run on either side): the same fp32
   predictions (per decoder layer logits and boxes of K groups of N
   queries, plus the K groups' top-N encoder proposals) and targets go to
   its ``HungarianMatcher(group_detr=K)`` / ``SetCriterion(group_detr=K)``
   and to our detector's loss step (``QueryLosses.branch_losses`` of a
   Group-DINO built from ``configs/shapes/group-dino-tiny_shapes.py``,
   K = 3, and with K = 11 of ``configs/group_detr/
   group-dino-4scale_r50_4xb2-12e_coco.py``): the main group through the
   detector's one-to-one loss, the extra groups through
   ``GroupQueryBranch.loss`` and ``GroupOneToOneAssigner``.  Compared, at
   1e-5 relative (observed: at most 2.3e-7 on the terms, 1.7e-7 on the
   gradients):

   * the per-group matching: every decoder layer's and the encoder
     proposals' (query, ground truth) pairs of every group and image
     (``matcher.py``:99-108: one Hungarian solve per group block),
     exactly;
   * every loss term (focal classification, L1, GIoU; each decoder layer
     and the encoder proposals) times our config's weights (1 / 5 / 2:
     LW-DETR applies its ``weight_dict`` outside the criterion,
     ``engine.py``:59, so its raw terms are weighted here);
   * the normaliser: LW-DETR divides every term by K x the number of
     targets, at least 1 (``lwdetr.py``:417-423); ours by the matched
     queries, at least 1 (mmdet's ``bg_cls_weight`` is 0 with focal loss,
     so the classification normaliser is the same count), of the
     call (N_gt for the main group and each group's encoder proposals,
     (K - 1) x N_gt for the extra groups' decoder layers), i.e. K x N_gt
     once the group weight is taken out;
   * the 1 / K weighting: LW-DETR's one call over K groups equals the
     mean of its per-group calls (which is Paddle's recipe: each group's
     loss, then / K, ``detr_head.py``:431-438); our main group's terms
     equal LW-DETR's group-0 terms / K and our ``group_`` terms the sum of
     its groups 1..K-1 / K;
   * the gradients of the summed, weighted loss w.r.t. all four
     prediction tensors (relative norm of the difference).

   Not compared with LW-DETR, and why:

   * denoising: LW-DETR has none; Group-DINO (PaddleDetection,
     ``group_detr_transformer.py``:618-650) draws denoising queries per
     group with its own label embedding, and each group's loss includes
     its denoising terms before the / K.  Our per-group denoising losses
     are checked against that recipe (part 2), not against code run;
   * LW-DETR's loss weights (``main.py``: class 2; its script: IA-BCE
     with class 1) and its IA-BCE / varifocal / position-supervised
     classification options: Group-DINO uses focal loss with
     class 1 / bbox 5 / giou 2 (``group_dino_r50.yml``:44, our config's),
     so only the focal path is run, with our weights;
   * ``sum_group_losses=True`` (LW-DETR option, not its default: groups
     summed, not averaged);
   * images with more targets than queries: LW-DETR normalises by the
     targets, we by the matched queries; here every image has fewer
     targets than N, where both agree;
   * the matching cost's log epsilon (LW-DETR 1e-8, mmdet's
     ``FocalLossCost`` 1e-12) and its float rounding: the costs are not
     compared, the pairs they give are (exactly, and they agree here);
   * ``class_error`` and ``cardinality_error`` (logging only) and the
     multi-process averaging of the normaliser (one process here);
   * LW-DETR's model is not run (backbone, transformer): its per-group
     two-stage proposals (``transformer.py``:229-255: per group its own
     projection, class and box heads, top N by the best class logit) are
     PaddleDetection's design, which part 3 compares with ours.

2. **Per-group denoising, PaddleDetection's recipe** (read, not run):
   a full training loss of the Group-DINO shapes model; each group's
   denoising terms as our denoising code gives them (main group: the
   detector's denoising branch; extra groups: the group branch's
   denoisers) must reach the loss as the sum over the K groups / K.
   Not compared: the denoising terms themselves (DINO's, in every group;
   Paddle's ``DINOLoss`` is not run), the order inside a group (Paddle:
   denoising queries first, ``group_detr_transformer.py``:826-848; ours:
   matching queries first; no effect on the loss) and the extra groups'
   content initialisation (Paddle N(0, 1), ours the main group's xavier;
   a documented choice of ``group.py``).

3. **Per-group query selection, PaddleDetection's code read as the
   reference**: ``GroupDINOTransformer._get_encoder_output_anchors`` and
   ``_get_decoder_input`` written out step by step in the test (see
   :func:`_paddle_selection`) on a constructed encoder output, against
   our main queries and ``GroupQueryBranch.make_queries``.
"""
import copy
import functools
import os.path as osp

import pytest
import torch
import torch.nn.functional as F
from mmdet.structures import DetDataSample
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmengine.config import Config
from mmengine.structures import InstanceData
from torch import nn

import group_detr_reference
from conftest import REPO_ROOT
from detr_testing import losses_with_seed, make_batch
from projects_detr_plus.models.branches import SetPredictions
from projects_detr_plus.models.branches.queries import MAIN, QuerySet
from projects_detr_plus.models.detectors import query_losses
from projects_detr_plus.models.losses import set_losses

torch.set_num_threads(1)

SHAPES_CFG = 'configs/shapes/group-dino-tiny_shapes.py'
COCO_CFG = 'configs/group_detr/group-dino-4scale_r50_4xb2-12e_coco.py'
IMAGE_SHAPES = ((96, 128), (80, 112), (64, 64))  # (h, w) per image
NUM_GTS = (4, 0, 7)  # fewer than N everywhere; one image without any
RTOL = 1e-5
# LW-DETR's raw term -> ours
TERMS = dict(loss_ce='loss_cls', loss_bbox='loss_bbox', loss_giou='loss_iou')

needs_reference = pytest.mark.skipif(
    not group_detr_reference.available(),
    reason='the authors\' code is not at ../shared/reference')


@functools.lru_cache(maxsize=None)
def _config(path):
    return Config.fromfile(osp.join(REPO_ROOT, path))


def _num_groups(path):
    return _config(path).model.branches[0]['num_groups']


def _model(num_groups, dn=False, num_queries=None, init=False):
    """The shapes Group-DINO (weights seeded; ``init``: initialised as
    in training), K groups, without denoising unless ``dn``."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    cfg = copy.deepcopy(_config(SHAPES_CFG).model)
    cfg.branches[0]['num_groups'] = num_groups
    if not dn:
        cfg.dn_cfg = None
    if num_queries:
        cfg.num_queries = num_queries
    torch.manual_seed(0)
    model = MODELS.build(cfg)
    if init:
        model.init_weights()
    model.train()
    return model


def test_the_shapes_model_has_the_coco_recipe_losses():
    """The model the comparison builds (shapes config) has the COCO
    Group-DINO config's loss terms, weights, match costs and assigner;
    only K (3 vs 11: both compared), N, sizes and classes differ."""
    shapes, coco = _config(SHAPES_CFG).model, _config(COCO_CFG).model
    for key in ('loss_cls', 'loss_bbox', 'loss_iou', 'sync_cls_avg_factor'):
        assert shapes.bbox_head[key] == coco.bbox_head[key], key
    assert shapes.train_cfg == coco.train_cfg
    assert coco.train_cfg.assigner.type == 'GroupOneToOneAssigner'
    assert (_num_groups(SHAPES_CFG), _num_groups(COCO_CFG)) == (3, 11)


def _problem(num_groups, num_queries, num_classes, num_layers, seed=0):
    """Ground truth (pixel xyxy) and, for K groups of N queries, per
    decoder layer logits and boxes near the ground truth (normalised
    cxcywh), and the encoder proposals' logits and boxes."""
    gen = torch.Generator().manual_seed(seed)
    samples, near = [], []
    total = num_groups * num_queries
    for count, (h, w) in zip(NUM_GTS, IMAGE_SHAPES):
        centre = torch.rand(count, 2, generator=gen) * 0.5 + 0.25
        size = torch.rand(count, 2, generator=gen) * 0.3 + 0.1
        boxes = torch.cat([centre, size], 1)
        scale = torch.tensor([w, h, w, h], dtype=torch.float)
        samples.append(
            DetDataSample(
                metainfo=dict(img_shape=(h, w)),
                gt_instances=InstanceData(
                    bboxes=bbox_cxcywh_to_xyxy(boxes) * scale,
                    labels=torch.randint(
                        0, num_classes, (count, ), generator=gen))))
        if count == 0:
            boxes = torch.rand(1, 4, generator=gen) * 0.4 + 0.3
        near.append(boxes[torch.arange(total) % len(boxes)])
    near = torch.stack(near)
    bs = len(NUM_GTS)

    def boxes_near(*shape):
        noise = torch.randn(*shape, bs, total, 4, generator=gen) * 0.05
        return (near + noise).clamp(0.02, 0.98)

    tensors = dict(
        cls=torch.randn(num_layers, bs, total, num_classes, generator=gen) -
        1.0,
        box=boxes_near(num_layers),
        enc_cls=torch.randn(bs, total, num_classes, generator=gen) - 1.0,
        enc_box=boxes_near(1)[0])
    for value in tensors.values():
        value.requires_grad_(True)
    return samples, tensors


def _copy(t):
    return {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}


def _targets(samples):
    """LW-DETR's targets: normalised cxcywh, as our set loss makes them
    from the pixel boxes."""
    targets = []
    for s in samples:
        h, w = s.metainfo['img_shape']
        factor = torch.tensor([w, h, w, h], dtype=torch.float)
        targets.append(
            dict(
                boxes=bbox_xyxy_to_cxcywh(s.gt_instances.bboxes / factor),
                labels=s.gt_instances.labels))
    return targets


def _our_losses(model, samples, t, monkeypatch):
    """Our detector's loss step on the given predictions (the decoder's
    split into query sets replaced by them), with every assignment and
    every set-loss call recorded."""
    branch = model.extra_branches[0]
    size, extra = model.num_queries, branch.num_extra_groups
    bs = len(samples)

    def predictions(start, stop):
        cls = t['cls'][:, :, start:stop]
        return SetPredictions(cls, t['box'][:, :, start:stop],
                              cls.new_zeros(cls.shape[:3] + (0, )), [])

    def query_set(name, count, **kwargs):
        return QuerySet(name, t['cls'].new_zeros(bs, count, 1),
                        t['cls'].new_zeros(bs, count, 4), **kwargs)

    enc = [(t['enc_cls'][:, g * size:(g + 1) * size],
            t['enc_box'][:, g * size:(g + 1) * size])
           for g in range(extra + 1)]
    query_sets = [
        query_set(MAIN, size),
        query_set(
            branch.name,
            extra * size,
            num_groups=extra,
            meta=dict(enc_losses=enc[1:], dn=[]))
    ]
    split = [predictions(0, size), predictions(size, None)]
    monkeypatch.setattr(
        model, '_split_predictions', lambda *args: split, raising=False)
    assigned, normalisers = [], []
    assigner = model.bbox_head.assigner
    assign = assigner.assign

    def recording_assign(pred_instances, gt_instances, **kwargs):
        result = assign(pred_instances, gt_instances, **kwargs)
        assigned.append((pred_instances.scores, kwargs.get('num_groups',
                                                           1), result.gt_inds))
        return result

    monkeypatch.setattr(assigner, 'assign', recording_assign)
    set_loss = set_losses.set_loss

    def recording_set_loss(head, cls_scores, bbox_preds, targets):
        normalisers.append((targets.num_pos, targets.cls_avg_factor))
        return set_loss(head, cls_scores, bbox_preds, targets)

    monkeypatch.setattr(set_losses, 'set_loss', recording_set_loss)
    monkeypatch.setattr(query_losses, 'set_loss', recording_set_loss)
    losses = model.branch_losses(
        hidden_states=None,
        references=None,
        enc_outputs_class=enc[0][0],
        enc_outputs_coord=enc[0][1],
        query_sets=query_sets,
        batch_data_samples=samples)
    return losses, assigned, normalisers


def _outputs(t, rows=slice(None)):
    """LW-DETR's ``outputs`` of queries ``rows`` (all K groups: the model
    concatenates the groups along the query axis, ``lwdetr.py``:67-68)."""

    def layer(cls, box):
        return dict(pred_logits=cls[:, rows], pred_boxes=box[:, rows])

    layers = len(t['cls'])
    return dict(
        layer(t['cls'][-1], t['box'][-1]),
        aux_outputs=[
            layer(t['cls'][i], t['box'][i]) for i in range(layers - 1)
        ],
        enc_outputs=layer(t['enc_cls'], t['enc_box']))


def _criterion(model, num_groups):
    """LW-DETR's ``SetCriterion`` and ``HungarianMatcher`` with our
    config's match-cost weights (class 2, L1 5, GIoU 2: also LW-DETR's
    ``set_cost_*`` defaults) and focal alpha (0.25, LW-DETR's)."""
    lwdetr, matcher = group_detr_reference.load()
    costs = {type(c).__name__: c for c in model.bbox_head.assigner.match_costs}
    assert (costs['FocalLossCost'].alpha, costs['FocalLossCost'].gamma) \
        == (0.25, 2)  # LW-DETR's matcher hard-codes these
    assert costs['IoUCost'].iou_mode == 'giou'
    criterion = lwdetr.SetCriterion(
        model.bbox_head.num_classes,
        matcher.HungarianMatcher(costs['FocalLossCost'].weight,
                                 costs['BBoxL1Cost'].weight,
                                 costs['IoUCost'].weight),
        weight_dict={},
        focal_alpha=model.bbox_head.loss_cls.alpha,
        losses=['labels', 'boxes'],
        group_detr=num_groups)
    return criterion.train()


def _their_losses(model, samples, t, num_groups, rows=slice(None)):
    """LW-DETR's terms on queries ``rows``, weighted as our config weighs
    them, under our names (``loss_giou_1`` -> ``d1.loss_iou``,
    ``loss_ce_enc`` -> ``enc_loss_cls``), and the ``num_boxes`` it
    normalised them by."""
    criterion = _criterion(model, num_groups)
    seen = []
    get_loss = criterion.get_loss

    def recording(loss, outputs, targets, indices, num_boxes, **kwargs):
        seen.append(num_boxes)
        return get_loss(loss, outputs, targets, indices, num_boxes, **kwargs)

    criterion.get_loss = recording
    raw = criterion(_outputs(t, rows), _targets(samples))
    head = model.bbox_head
    weights = dict(
        loss_ce=head.loss_cls.loss_weight,
        loss_bbox=head.loss_bbox.loss_weight,
        loss_giou=head.loss_iou.loss_weight)
    named = {}
    for key, value in raw.items():
        base, rest = '_'.join(key.split('_')[:2]), key.split('_')[2:]
        if base not in TERMS:
            continue  # class_error: logging only
        name = TERMS[base]
        if rest == ['enc']:
            name = f'enc_{name}'
        elif rest:
            name = f'd{rest[0]}.{name}'
        named[name] = value * weights[base]
    assert len(set(seen)) == 1, seen
    return named, seen[0]


def _group_key(key):
    """``d0.loss_cls`` -> ``d0.group_loss_cls``, ``enc_loss_iou`` ->
    ``group_enc_loss_iou``."""
    layer, _, name = key.rpartition('.')
    return f'{layer}.group_{name}' if layer else f'group_{name}'


def _close(actual, expected, msg):
    torch.testing.assert_close(
        actual.reshape(()), expected.reshape(()), rtol=RTOL, atol=0, msg=msg)


K_CONFIGS = pytest.mark.parametrize(
    'config', [SHAPES_CFG, COCO_CFG], ids=['K3-shapes', 'K11-coco'])


def _setup(config):
    """Our model with the config's K (N, layers, classes of the shapes
    model) and a problem for it."""
    num_groups = _num_groups(config)
    model = _model(num_groups)
    samples, t = _problem(num_groups, model.num_queries,
                          model.bbox_head.num_classes,
                          model.decoder.num_layers)
    return model, samples, t, num_groups


@needs_reference
@K_CONFIGS
def test_per_group_matching_equals_lwdetr(config, monkeypatch):
    """Every decoder layer and the encoder proposals, every image: our
    (query, gt) pairs of all K groups (main group: the detector's
    one-to-one loss; extra groups: one ``GroupOneToOneAssigner`` call;
    each extra group's proposals: one call each) equal
    ``HungarianMatcher(group_detr=K)``'s."""
    model, samples, t, num_groups = _setup(config)
    size, bs = model.num_queries, len(samples)
    layers, extra = model.decoder.num_layers, num_groups - 1
    _, assigned, _ = _our_losses(model, samples, t, monkeypatch)
    # the loss step's call order: main decoder layers, main proposals,
    # the extra groups' decoder layers, each extra group's proposals
    # (each per image); checked against the scores each call got
    calls = ([(layer, 0, 1) for layer in range(layers)] + [('enc', 0, 1)] +
             [(layer, 1, extra)
              for layer in range(layers)] + [('enc', 1 + g, 1)
                                             for g in range(extra)])
    assert len(assigned) == len(calls) * bs
    ours = {}
    for n, (layer, first, count) in enumerate(calls):
        cls = t['enc_cls'] if layer == 'enc' else t['cls'][layer]
        rows = slice(first * size, (first + count) * size)
        for image in range(bs):
            scores, groups, gt_inds = assigned[n * bs + image]
            assert torch.equal(scores, cls[image, rows])
            assert groups == count
            query = torch.nonzero(gt_inds > 0).squeeze(1)
            pairs = ours.setdefault((layer, image), [[], []])
            pairs[0].append(query + first * size)
            pairs[1].append(gt_inds[query] - 1)
    matcher = _criterion(model, num_groups).matcher
    for layer in [*range(layers), 'enc']:
        outputs = _outputs(t)
        if layer == 'enc':
            outputs = outputs['enc_outputs']
        elif layer < layers - 1:
            outputs = outputs['aux_outputs'][layer]
        outputs = {
            k: v.detach()
            for k, v in outputs.items() if k.startswith('pred_')
        }
        theirs = matcher(outputs, _targets(samples), group_detr=num_groups)
        for image, (query, gt) in enumerate(theirs):
            mine_query, mine_gt = (torch.cat(x) for x in ours[(layer, image)])
            order = torch.argsort(mine_query)
            assert torch.equal(mine_query[order], query), (layer, image)
            assert torch.equal(mine_gt[order], gt), (layer, image)
            # every group matched every target once
            assert len(query) == num_groups * NUM_GTS[image]


@needs_reference
@K_CONFIGS
def test_losses_normalisers_and_group_weights_equal_lwdetr(
        config, monkeypatch):
    """Every term of every decoder layer and of the encoder proposals:
    main + ``group_`` term = LW-DETR's K-group term; the main term =
    LW-DETR's group-0 term / K, the ``group_`` term = its groups 1..K-1
    / K; each of our normalisers over the weight of its group =
    LW-DETR's ``num_boxes`` (K x the targets)."""
    model, samples, t, num_groups = _setup(config)
    size, layers = model.num_queries, model.decoder.num_layers
    ours, _, normalisers = _our_losses(model, samples, t, monkeypatch)
    with torch.no_grad():
        theirs, num_boxes = _their_losses(model, samples, t, num_groups)
        per_group = [
            _their_losses(model, samples, t, 1, slice(g * size,
                                                      (g + 1) * size))
            for g in range(num_groups)
        ]
    assert num_boxes == num_groups * sum(NUM_GTS)
    assert [n for _, n in per_group] == [sum(NUM_GTS)] * num_groups
    assert len(theirs) == 3 * (layers + 1)
    assert sorted(ours) == sorted([*theirs, *map(_group_key, theirs)])
    for key, value in theirs.items():
        group_key = _group_key(key)
        # the reference's own 1 / K: K groups in one call = their mean
        _close(value,
               sum(p[key] for p, _ in per_group) / num_groups,
               f'LW-DETR {key}: K groups in one call vs group mean')
        _close(ours[key] + ours[group_key], value, key)
        _close(ours[key], per_group[0][0][key] / num_groups,
               f'{key} (main group) vs LW-DETR group 0 / K')
        _close(ours[group_key],
               sum(p[key] for p, _ in per_group[1:]) / num_groups,
               f'{group_key} vs LW-DETR groups 1..K-1 / K')
    # our normalisers in the loss step's call order (main decoder layers,
    # main proposals, extra groups' decoder layers, each extra group's
    # proposals) over the weight those terms get
    branch = model.extra_branches[0]
    weights = ([branch.main_loss_weight] * (layers + 1) +
               [branch.loss_weight] * layers +
               [branch.loss_weight / branch.num_extra_groups] *
               branch.num_extra_groups)
    assert len(normalisers) == len(weights)
    for (num_pos, cls_avg_factor), weight in zip(normalisers, weights):
        assert num_pos / weight == pytest.approx(num_boxes, rel=1e-9)
        assert cls_avg_factor / weight == pytest.approx(num_boxes, rel=1e-9)


@needs_reference
@K_CONFIGS
def test_gradients_equal_lwdetr(config, monkeypatch):
    """Gradients of the summed weighted loss w.r.t. the decoder logits and
    boxes of every layer and group and the proposals' logits and boxes
    (relative norm of the difference)."""
    model, samples, t, num_groups = _setup(config)
    ours, _, _ = _our_losses(model, samples, t, monkeypatch)
    again = _copy(t)
    theirs, _ = _their_losses(model, samples, again, num_groups)
    names = sorted(t)
    grads_ours = torch.autograd.grad(sum(ours.values()), [t[n] for n in names])
    grads_theirs = torch.autograd.grad(
        sum(theirs.values()), [again[n] for n in names])
    for name, mine, expected in zip(names, grads_ours, grads_theirs):
        assert expected.norm() > 0, name
        assert (mine - expected).norm() <= RTOL * expected.norm(), name


def test_per_group_denoising_is_averaged_as_paddle_group_dino():
    """PaddleDetection's Group-DINO loss (``detr_head.py``:400-438, read):
    for each of the K groups its own ``DINOLoss`` (matching, encoder and
    that group's denoising terms), summed over the groups, then / K.
    Each group's denoising queries are drawn by its own call of
    ``get_contrastive_denoising_training_group`` with its own label
    embedding (``group_detr_transformer.py``:618-650).

    Ours on a full training loss: the denoising terms each group's
    denoiser returns (main group: the detector's denoising branch;
    extra groups: the group branch's own denoisers), raw, must reach the
    loss as Paddle's sum over groups / K: ``dn_*`` = group 0's / K,
    ``group_dn_*`` = groups 1..K-1's / K."""
    num_groups = _num_groups(SHAPES_CFG)
    model = _model(num_groups, dn=True)
    branch = model.extra_branches[0]
    denoisers = [model.dn_query_generator, *branch.denoisers]
    assert len(denoisers) == num_groups
    raw = [None] * num_groups
    for g, denoiser in enumerate(denoisers):

        def recording(*args, g=g, loss=denoiser.loss, **kwargs):
            raw[g] = loss(*args, **kwargs)
            return raw[g]

        denoiser.loss = recording
    losses = losses_with_seed(model, *make_batch(size=96))
    keys = sorted(raw[0])
    assert len(keys) == 3 * model.decoder.num_layers
    assert all(sorted(r) == keys for r in raw)
    for key in keys:
        paddle_mean = sum(r[key] for r in raw) / num_groups
        _close(losses[key] + losses[_group_key(key)], paddle_mean, key)
        _close(losses[key], raw[0][key] / num_groups, key)
        _close(losses[_group_key(key)],
               sum(r[key] for r in raw[1:]) / num_groups, _group_key(key))
    # each group's own draw: the groups' denoising terms differ
    assert len({r['dn_loss_bbox'].item() for r in raw}) == num_groups


# Part 3: PaddleDetection's per-group query selection, read from
# ppdet/modeling/transformers/group_detr_transformer.py and written out
# here step by step (torch, per image) to compare with ours.
#
# _get_encoder_output_anchors (lines 689-735):
#   * per level l of (h, w): valid_H, valid_W = the unpadded rows and
#     columns; anchor of token (x, y) = ((x + 0.5) / valid_W,
#     (y + 0.5) / valid_H, 0.05 * 2**l, 0.05 * 2**l);
#   * valid = every anchor coordinate in (eps, 1 - eps), eps = 0.01, and
#     the token not padding; anchors = log(a / (1 - a)), +inf where not
#     valid (one set of anchors, shared by every group);
#   * memory = 0 where not valid; output_memory[g] = enc_output[g](memory),
#     enc_output[g] = Linear + LayerNorm, one per group (line 459).
# _get_decoder_input (lines 738-800):
#   * group 0: enc_score_head and enc_bbox_head (an MLP of 3 Linear
#     layers, ReLU between) on output_memory[0]; group g >= 1: its own
#     enc_score_head_dq[g - 1] and enc_bbox_head_dq[g - 1] on
#     output_memory[g];
#   * coords (before the sigmoid) = bbox head + anchors; each image's
#     top num_queries tokens by the group's own best class logit
#     (topk of class.max(-1), in descending order);
#   * the group's reference boxes = sigmoid(selected coords), detached;
#     its encoder loss gets the selected logits and sigmoid(selected
#     coords) undetached (detr_head.py:414-421: layer 0 of that group's
#     loss);
#   * learnt_init_query (the yml's True): the content of group 0 is
#     tgt_embed, of group g its own tgt_embed_dual[g - 1] (lines 806-813).
def _paddle_anchors(memory_mask, spatial_shapes, eps=0.01):
    """(bs, tokens, 4) anchors before the sigmoid, +inf where not valid;
    (bs, tokens) valid."""
    bs, levels, start = memory_mask.shape[0], [], 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        valid = ~memory_mask[:, start:start + h * w].reshape(bs, h, w)
        size = 0.05 * 2.0**level
        levels.append(
            torch.tensor([[[(x + 0.5) / int(valid[image, 0, :].sum()),
                            (y + 0.5) / int(valid[image, :, 0].sum()), size,
                            size] for y in range(h) for x in range(w)]
                          for image in range(bs)]))
        start += h * w
    anchors = torch.cat(levels, 1)
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1) & ~memory_mask
    logit = torch.log(anchors / (1 - anchors))
    return logit.masked_fill(~valid[..., None], float('inf')), valid


def _paddle_selection(memory, anchors, valid, heads, num_queries):
    """Per group: (reference boxes before the sigmoid (bs, N, 4),
    selected logits (bs, N, C), token indices (bs, N)); ``heads``: the
    group's (Linear, LayerNorm, class Linear, box MLP layers)."""
    memory = memory.masked_fill(~valid[..., None], 0.0)
    groups = []
    for fc, norm, cls, box_layers in heads:
        out = F.layer_norm(
            F.linear(memory, fc.weight, fc.bias), norm.normalized_shape,
            norm.weight, norm.bias, norm.eps)
        logits = F.linear(out, cls.weight, cls.bias)
        delta = out
        for n, layer in enumerate(box_layers):
            delta = F.linear(delta, layer.weight, layer.bias)
            if n < len(box_layers) - 1:
                delta = delta.relu()
        coords = delta + anchors
        score = logits.max(-1).values.detach()  # ranks only
        picked = torch.tensor([
            sorted(range(score.shape[1]),
                   key=lambda k: -float(s[k]))[:num_queries] for s in score
        ])
        groups.append(
            tuple(
                torch.stack([x[i][p] for i, p in enumerate(picked)])
                for x in (coords, logits)) + (picked, ))
    return groups


def _linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def test_per_group_selection_equals_paddle_group_dino():
    """A constructed encoder output (2 images, the second padded, 4
    levels, 65 tokens, N = 8, K = 3): each group's reference boxes,
    encoder-loss inputs and content are Paddle's, from the group's own
    projection and heads; the selections differ between groups."""
    num_groups, size = _num_groups(SHAPES_CFG), 8
    model = _model(num_groups, num_queries=size, init=True)
    branch, head = model.extra_branches[0], model.bbox_head
    layers = model.decoder.num_layers
    spatial_shapes = torch.tensor([[6, 8], [3, 4], [2, 2], [1, 1]])
    gen = torch.Generator().manual_seed(1)
    masks = []  # image 1 padded at the right and the bottom
    for (h, w), (valid_h, valid_w) in zip(spatial_shapes.tolist(), [(4, 6),
                                                                    (2, 3),
                                                                    (1, 2),
                                                                    (1, 1)]):
        mask = torch.zeros(2, h, w, dtype=torch.bool)
        mask[1, valid_h:] = True
        mask[1, :, valid_w:] = True
        masks.append(mask.flatten(1))
    memory_mask = torch.cat(masks, 1)
    memory = torch.randn(
        2, memory_mask.shape[1], model.embed_dims, generator=gen)
    context = model.query_context(memory, memory_mask, spatial_shapes)
    main, enc_cls, enc_coord = model.main_queries(context)
    group = branch.make_queries(main, context, model, [])

    anchors, valid = _paddle_anchors(memory_mask, spatial_shapes)
    assert (~valid).any() and valid.any()
    torch.testing.assert_close(context.enc_anchors, anchors)
    heads = [(model.memory_trans_fc, model.memory_trans_norm,
              head.cls_branches[layers], _linears(head.reg_branches[layers]))]
    heads += [(branch.memory_trans_fc[g], branch.memory_trans_norm[g],
               branch.enc_cls[g], _linears(branch.enc_reg[g]))
              for g in range(num_groups - 1)]
    assert all(len(h[3]) == 3 for h in heads)  # Paddle's 3-layer MLP
    expected = _paddle_selection(memory, anchors, valid, heads, size)

    ours = [(main.reference, enc_cls, enc_coord, main.query)]
    for g in range(num_groups - 1):
        rows = slice(g * size, (g + 1) * size)
        scores, coords = group.meta['enc_losses'][g]
        ours.append(
            (group.reference[:, rows], scores, coords, group.query[:, rows]))
    contents = [model.query_embedding.weight, *branch.content_tables()]
    for g, ((reference, scores, coords, content),
            (paddle_coords, paddle_logits,
             _)) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(reference, paddle_coords, msg=str(g))
        torch.testing.assert_close(scores, paddle_logits, msg=str(g))
        torch.testing.assert_close(coords, paddle_coords.sigmoid(), msg=str(g))
        assert not reference.requires_grad  # Paddle: .detach()
        assert scores.requires_grad and coords.requires_grad
        assert torch.equal(content, contents[g][None].expand(2, -1, -1))
    picked = [set(map(tuple, p.tolist())) for _, _, p in expected]
    assert all(picked[a] != picked[b] for a in range(num_groups)
               for b in range(a))
    # the encoder loss of extra group 1 trains its own heads only
    scores, coords = group.meta['enc_losses'][0]
    (scores.sum() + coords.sum()).backward()
    assert branch.enc_cls[0].weight.grad.abs().sum() > 0
    assert branch.memory_trans_fc[0].weight.grad.abs().sum() > 0
    assert branch.enc_cls[1].weight.grad is None
    assert head.cls_branches[layers].weight.grad is None
