"""DDQ FCN and DDQ R-CNN against the authors' code, by execution.

``tests/ddq_upstream/make_reference.py`` ran the authors' detectors
(``jshilong/DDQ``, commit in the JSON files: ``SingleStageDetector`` with
``DDQFCNHead``, and ``DDQRCNN`` with ``DDQFCNRPN`` and the bundled mmdet
2.22 ``SparseRoIHead`` / ``DIIHead``) on fixed weights and inputs and
committed the numbers (``ddq_fcn.json`` / ``.pt``, ``ddq_rcnn.json`` /
``.pt``).  Here our models, built from ``configs/shapes/ddq-{fcn,rcnn}-
tiny_shapes.py`` (the sizes the reference used), get the same weights
(:func:`common.weight_for` through the key mapping the reference
recorded, itself checked) and inputs, and must reproduce, fp32 on CPU:

* predictions (eval, BN running statistics): every (label, box, score);
* one training step: the dense score and distance maps of both
  branches, the candidates (point ids and boxes), the distinct queries'
  point ids in order (DQS NMS), every Hungarian assignment (positives,
  gt, IoU, alignment metric), every loss term per image, the total and
  the gradient of every parameter (norm and a fixed random projection);
* DDQ R-CNN also: the proposals and their features (padded as released),
  both stages' class logits and boxes, the stages' assignments and
  losses;
* a second training step with an image without ground truth (losses,
  total, gradients);
* the official R50 1x configs: the same parameters and buffers, and a
  released DDQ FCN state dict (``neck.0.*``, no version metadata) loads
  strictly into ours, every weight in its place.

Tolerance: 1e-5 relative to the largest magnitude of each compared tensor.
Measured: maps, candidates, distinct ids, assignments, proposals, stage
outputs and predictions are bitwise equal; losses differ by <= 3e-7
(float rounding of their sums); gradients by <= 3e-6 in the heads and
neck and <= 9e-6 in the backbone (``BACKBONE_GRAD_RTOL``).  Ids, labels,
assignments: exact.

What differs on purpose (and how the test still compares): the released
DDQ R-CNN lets zero padding proposals into the stages at test; ours runs
a padded image alone on its real proposals.  The test compares our stages
on the padded batch (its proposals all marked valid, i.e. the released
behaviour) for both images, and our default prediction for the image
without padding.  The released ``DDQFCNRPN`` always keeps 300 proposals
(``DDQFCNHead.__init__`` resets ``num_distinct_queries`` to its default):
our R-CNN is built with 300 here.
"""
import json
import os.path as osp
import re

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.structures import InstanceData

from conftest import REPO_ROOT
from ddq_upstream import common

HERE = osp.join(REPO_ROOT, 'tests', 'ddq_upstream')
RTOL = 1e-5
# the backbone's gradients: the losses agree to ~1e-7 (float rounding of
# the loss sums), and BN's backward (which subtracts the batch means of the
# incoming gradient) amplifies that towards 1e-5 in the first layers
BACKBONE_GRAD_RTOL = 5e-5


def reference(name):
    with open(osp.join(HERE, f'{name}.json')) as f:
        numbers = json.load(f)
    return numbers, torch.load(osp.join(HERE, numbers['tensors']))


FCN, FCN_TENSORS = reference('ddq_fcn')
RCNN, RCNN_TENSORS = reference('ddq_rcnn')


# ----------------------------------------------------------------------
# models, weights, inputs
# ----------------------------------------------------------------------
def config(name):
    return Config.fromfile(
        osp.join(REPO_ROOT, 'configs', 'shapes', f'{name}_shapes.py')).model


def build(cfg):
    """Our detector of ``cfg`` (no ``init_weights``: every parameter and
    buffer is set by :func:`set_weights`)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    return MODELS.build(cfg)


def set_weights(model, ref):
    """:func:`common.weight_for` of every key, in place (``_metadata``
    kept: no mmdet key hack); the mapping must cover our state dict."""
    state = model.state_dict()
    ours = {key: list(value.shape) for key, value in state.items()}
    mapped = {our: shape for _, our, shape in ref['mapping']}
    assert mapped == ours
    with torch.no_grad():
        for key, shape in ours.items():
            state[key].copy_(common.weight_for(key, shape))
    return model


def our_fcn():
    return set_weights(build(config('ddq-fcn-tiny')), FCN)


def our_rcnn():
    cfg = config('ddq-rcnn-tiny')
    cfg.rpn_head.num_distinct_queries = 300  # as the released code runs
    return set_weights(build(cfg), RCNN)


def batch(empty_images=()):
    """Images (2, 3, 272, 256) and data samples, as the reference's."""
    h, w = common.BATCH_HW
    samples = []
    for meta, (boxes, labels) in zip(common.IMAGES,
                                     common.ground_truth(empty_images)):
        (ih, iw), (sw, sh) = meta['img_shape'], meta['scale_factor']
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(ih, iw),
                ori_shape=(round(ih / sh), round(iw / sw)),
                pad_shape=(h, w),
                batch_input_shape=(h, w),
                scale_factor=(sw, sh)))
        sample.gt_instances = InstanceData(bboxes=boxes, labels=labels)
        samples.append(sample)
    return common.images(), samples


# ----------------------------------------------------------------------
# recording and comparing
# ----------------------------------------------------------------------
def record(monkeypatch, owner, name):
    """Calls of ``owner.name`` go on; their return values are appended to
    the list returned."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def close(ours, ref, what, rtol=RTOL):
    """``ours`` equals ``ref`` to ``rtol`` of ref's largest magnitude."""
    ours = torch.as_tensor(ours).detach().double()
    ref = torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, what
    scale = float(ref.abs().max()) if ref.numel() else 0.
    torch.testing.assert_close(
        ours, ref, rtol=0, atol=rtol * max(scale, 1e-12), msg=what)


def level_maps(maps):
    """Per-level (B, K, H, W) -> (B, K, sum H W)."""
    return torch.cat([m.detach().flatten(2) for m in maps], 2)


def total_loss(losses):
    return sum(v for k, v in losses.items() if 'loss' in k)


def check_gradients(model, ref):
    """Every parameter's gradient: [norm, projection] as the reference."""
    for key, param in model.named_parameters():
        expected = ref[key]
        if expected is None:
            assert param.grad is None, key
            continue
        rtol = BACKBONE_GRAD_RTOL if key.startswith('backbone.') else RTOL
        grad = param.grad.double()
        direction = common.projection_for(key, grad.shape).double()
        norm, projection = expected
        close(grad.norm(), norm, f'{key} gradient norm', rtol)
        # a projection on N(0, 1) is ~ norm in size: compare to the norm
        assert abs(float((grad * direction).sum()) - projection) <= \
            rtol * norm, f'{key} gradient projection'


def check_assignments(results, ref, what):
    """Our AssignResults (one per image) against the reference's."""
    assert len(results) == len(ref), what
    for image, (result, expected) in enumerate(zip(results, ref)):
        pos = (result.gt_inds > 0).nonzero(as_tuple=True)[0]
        assert pos.tolist() == expected['pos'], f'{what} image {image}'
        assert (result.gt_inds[pos] - 1).tolist() == expected['gt'], \
            f'{what} image {image}'
        for name, attr in (('iou', 'max_overlaps'), ('metric',
                                                     'assign_metrics')):
            if name in expected:
                close(
                    getattr(result, attr), expected[name],
                    f'{what} image {image} {name}')


def check_detections(pred, ref, what):
    """``pred`` (InstanceData) against rows (label, box, score) by
    descending score."""
    order = pred.scores.argsort(descending=True, stable=True)
    ref = torch.tensor(ref, dtype=torch.float64).reshape(-1, 6)
    assert len(order) == len(ref), what
    assert pred.labels[order].tolist() == ref[:, 0].long().tolist(), what
    close(pred.bboxes[order], ref[:, 1:5], f'{what} boxes')
    close(pred.scores[order], ref[:, 5], f'{what} scores')


def check_dense_head(head_calls, ref, tensors, prefix=''):
    """The maps, candidates, distinct ids and assignments of a DDQ FCN
    head's training forward (recorded calls in ``head_calls``)."""
    outs = head_calls['forward'][0]
    names = ('scores', 'distances', 'aux_scores', 'aux_distances')
    for maps, name in zip(outs, names):
        close(level_maps(maps), tensors[f'{prefix}{name}'], f'{prefix}{name}')
    main, aux = head_calls['candidates']
    for (_, boxes, ids), name in ((main, ''), (aux, 'aux_')):
        assert torch.equal(ids, tensors[f'{name}candidate_ids']), name
        close(boxes, tensors[f'{name}candidate_boxes'], f'{name}boxes')
    kept = head_calls['distinct'][0]
    ids = main[2]
    assert [ids[b, keep].tolist() for b, keep in enumerate(kept)] == \
        ref['train']['distinct_ids']
    main_assign, aux_assign = head_calls['assign']
    check_assignments(main_assign, ref['train']['main_assign'], 'main')
    check_assignments(aux_assign, ref['train']['aux_assign'], 'aux')


def spy_dense_head(monkeypatch, head):
    """Record the FCN head's forward, candidates, distinct queries,
    assignments and per-image losses."""
    return dict(
        forward=record(monkeypatch, head, 'forward'),
        candidates=record(monkeypatch, head, 'candidates'),
        distinct=record(monkeypatch, head, 'distinct'),
        assign=(record(monkeypatch, head.main_loss.assigner, 'assign'),
                record(monkeypatch, head.aux_loss.assigner, 'assign')),
        losses=(record(monkeypatch, head.main_loss,
                       'loss'), record(monkeypatch, head.aux_loss, 'loss')))


def check_head_losses(head_calls, losses, ref_losses, prefix=''):
    """Per-image one-to-one and one-to-many losses, and their sums."""
    main, aux = head_calls['losses']
    for ours, name in ((main[0], ''), (aux[0], 'aux_')):
        for term in ('loss_cls', 'loss_bbox'):
            expected = ref_losses[f'{prefix}{name}{term}']
            close(
                torch.stack(ours[f'aux_{term}']), expected,
                f'{prefix}{name}{term}')
            close(losses[f'{prefix}{name}{term}'], sum(expected),
                  f'{prefix}{name}{term} total')


# ----------------------------------------------------------------------
# the mapping and the inputs
# ----------------------------------------------------------------------
@pytest.mark.parametrize('ref', [FCN, RCNN], ids=['fcn', 'rcnn'])
def test_weights_and_inputs_are_the_references(ref):
    """The key mapping is one-to-one, the regenerated weights and inputs
    are those the reference ran on (torch's generators unchanged)."""
    up_keys = [up for up, _, _ in ref['mapping']]
    our_keys = [our for _, our, _ in ref['mapping']]
    assert len(set(up_keys)) == len(set(our_keys)) == len(up_keys)
    assert our_keys == [common.our_key(key) for key in up_keys]
    for _, key, shape in ref['mapping']:
        close(
            common.checksum(common.weight_for(key, shape)),
            ref['weights_checksum'][key], key)
    close(common.checksum(common.images()), ref['inputs']['images'], 'img')
    for (boxes, labels), (ref_boxes,
                          ref_labels) in zip(common.ground_truth(),
                                             ref['inputs']['ground_truth']):
        close(boxes.flatten(), ref_boxes, 'gt boxes')
        assert labels.tolist() == ref_labels


OFFICIAL = dict(
    fcn=(FCN, 'configs/ddq_fcn/ddq-fcn_r50_1x_coco.py'),
    rcnn=(RCNN, 'configs/ddq_rcnn/ddq-rcnn_r50_1x_coco.py'))
# the released DDQ FCN config writes its neck as a list (``neck=[dict(type=
# 'FPN', ...)]``): mmdet 2 wraps it in an nn.Sequential, ``neck.0.*``
NECK_IN_A_LIST = (r'^neck\.0\.', 'neck.')


def official_state(name):
    """(ours, released): {key: shape} of the official R50 1x models."""
    ref, config = OFFICIAL[name]
    cfg = Config.fromfile(osp.join(REPO_ROOT, config)).model
    ours = {
        key: list(value.shape)
        for key, value in build(cfg).state_dict().items()
    }
    return ours, dict(ref['official_architecture'])


@pytest.mark.parametrize('name', ['fcn', 'rcnn'])
def test_official_config_builds_the_released_architecture(name):
    """Our R50 1x config and the released one build the same parameters
    and buffers (shapes; names up to the FCN's neck list): the shapes
    configs differ from them in sizes only."""
    ours, released = official_state(name)
    assert ours == {
        re.sub(*NECK_IN_A_LIST, key): shape
        for key, shape in released.items()
    }


def test_released_fcn_checkpoint_loads():
    """A released DDQ FCN state dict (its neck ``neck.0.*``, a plain dict
    without version metadata, as a conversion script writes) loads
    strictly, every weight where it belongs: the neck renamed by
    ``DDQFCN``'s load hook, and ``aux_conv_cls`` / ``aux_conv_reg`` not
    renamed into ``conv_cls`` / ``conv_reg`` by mmdet's legacy
    ``AnchorFreeHead`` hack (``DDQFCNHead._load_from_state_dict``)."""
    ours, released = official_state('fcn')
    assert set(ours) == {re.sub(*NECK_IN_A_LIST, key)
                         for key in released} != set(released)
    cfg = Config.fromfile(osp.join(REPO_ROOT, OFFICIAL['fcn'][1])).model
    model = build(cfg)
    gen = torch.Generator().manual_seed(0)
    state = {
        k:
        torch.randn(v.shape, generator=gen)
        if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }
    plain = {re.sub(r'^neck\.', 'neck.0.', k): v for k, v in state.items()}
    assert set(plain) == set(released)
    model.load_state_dict(plain, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------
# DDQ FCN
# ----------------------------------------------------------------------
def test_fcn_predictions(monkeypatch):
    model = our_fcn().eval()
    inputs, samples = batch()
    kept = record(monkeypatch, model.bbox_head, 'distinct')
    with torch.no_grad():
        results = model.predict(inputs, samples, rescale=True)
    assert [len(k) for k in kept[0]] == FCN['predict']['distinct_counts']
    for image, result in enumerate(results):
        check_detections(result.pred_instances,
                         FCN['predict']['detections'][image], f'image {image}')


def test_fcn_training_step(monkeypatch):
    model = our_fcn().train()
    inputs, samples = batch()
    calls = spy_dense_head(monkeypatch, model.bbox_head)
    losses = model.loss(inputs, samples)
    check_dense_head(calls, FCN, FCN_TENSORS)
    check_head_losses(calls, losses, FCN['train']['losses'])
    total = total_loss(losses)
    close(total, FCN['train']['total_loss'], 'total loss')
    total.backward()
    check_gradients(model, FCN['train']['gradients'])


# ----------------------------------------------------------------------
# DDQ R-CNN
# ----------------------------------------------------------------------
def check_proposals(proposals, tensors, prefix):
    """Our proposals (padded InstanceData per image) against the
    released (B, N, 4) boxes and (B, N, C) features."""
    close(
        torch.stack([p.bboxes for p in proposals]),
        tensors[f'{prefix}proposals'], f'{prefix}proposals')
    close(
        torch.stack([p.features for p in proposals]),
        tensors[f'{prefix}object_feats'], f'{prefix}object_feats')


def check_stages(stages, tensors, prefix):
    """Each stage's class logits (B, N, C) and boxes (B * N, 4)."""
    assert len(stages) == 2
    for stage, result in enumerate(stages):
        close(result['cls_score'], tensors[f'{prefix}stage{stage}_cls_score'],
              f'{prefix}stage {stage} logits')
        close(
            torch.cat(result['detached_proposals']),
            tensors[f'{prefix}stage{stage}_boxes'],
            f'{prefix}stage {stage} boxes')


def _as_released(monkeypatch, rpn_head):
    """Proposals all marked valid: the RoI head runs the padded batch, as
    the released code does."""
    original = rpn_head.predict

    def predict(*args, **kwargs):
        proposals = original(*args, **kwargs)
        for p in proposals:
            p.valid = torch.ones_like(p.valid)
        return proposals

    monkeypatch.setattr(rpn_head, 'predict', predict)


def test_rcnn_predictions_as_released(monkeypatch):
    """With padding in the stages, as the released code predicts."""
    model = our_rcnn().eval()
    inputs, samples = batch()
    _as_released(monkeypatch, model.rpn_head)
    proposals = record(monkeypatch, model.rpn_head, 'proposals')
    kept = record(monkeypatch, model.rpn_head, 'distinct_queries')
    stages = record(monkeypatch, model.roi_head, '_bbox_forward')
    with torch.no_grad():
        results = model.predict(inputs, samples, rescale=True)
    assert [q.point_ids.tolist() for q in kept[0]] == \
        RCNN['predict']['distinct_ids']
    counts = [len(q) for q in kept[0]]
    assert counts[0] != counts[1]  # the padded case
    check_proposals(proposals[0], RCNN_TENSORS, 'predict_')
    check_stages(stages, RCNN_TENSORS, 'predict_')
    for image, result in enumerate(results):
        check_detections(result.pred_instances,
                         RCNN['predict']['detections'][image],
                         f'image {image}')


def test_rcnn_unpadded_image_predicts_as_released():
    """Our default (padding kept out of the stages) changes nothing for
    the image that has no padding."""
    model = our_rcnn().eval()
    inputs, samples = batch()
    with torch.no_grad():
        results = model.predict(inputs, samples, rescale=True)
    counts = [len(ids) for ids in RCNN['predict']['distinct_ids']]
    full = counts.index(max(counts))
    check_detections(results[full].pred_instances,
                     RCNN['predict']['detections'][full], f'image {full}')


def test_rcnn_training_step(monkeypatch):
    model = our_rcnn().train()
    inputs, samples = batch()
    rpn, roi = model.rpn_head, model.roi_head
    calls = spy_dense_head(monkeypatch, rpn)
    proposals = record(monkeypatch, rpn, 'proposals')
    stages = record(monkeypatch, roi, '_bbox_forward')
    roi_assign = [
        record(monkeypatch, assigner, 'assign')
        for assigner in roi.bbox_assigner
    ]
    losses = model.loss(inputs, samples)
    check_dense_head(calls, RCNN, RCNN_TENSORS)
    check_proposals(proposals[0], RCNN_TENSORS, '')
    check_stages(stages, RCNN_TENSORS, '')
    for stage, results in enumerate(roi_assign):
        check_assignments(results, RCNN['train']['roi_assign'][stage],
                          f'stage {stage}')
    check_rcnn_losses(calls, losses, RCNN['train'])
    check_gradients(model, RCNN['train']['gradients'])


def check_rcnn_losses(calls, losses, ref):
    """Every term (proposal stage per image, both Sparse R-CNN stages) and
    the total, whose gradients it leaves."""
    check_head_losses(calls, losses, ref['losses'], prefix='rpn_')
    close(losses['rpn_num_distinct'], ref['losses']['rpn_num_proposal'],
          'count')
    for stage in range(2):
        for term in ('loss_cls', 'pos_acc', 'loss_bbox', 'loss_iou'):
            close(losses[f's{stage}.{term}'].reshape(
                ()), ref['losses'][f'stage{stage}_{term}'],
                  f'stage {stage} {term}')
    total = total_loss(losses)
    close(total, ref['total_loss'], 'total loss')
    total.backward()


# ----------------------------------------------------------------------
# an image without ground truth
# ----------------------------------------------------------------------
def test_fcn_training_step_with_an_empty_image(monkeypatch):
    """As released, an image without objects adds no loss at all (its
    queries get zero classification weights)."""
    model = our_fcn().train()
    calls = spy_dense_head(monkeypatch, model.bbox_head)
    losses = model.loss(*batch(common.EMPTY_IMAGES))
    ref = FCN['train_empty_image']
    check_head_losses(calls, losses, ref['losses'])
    total = total_loss(losses)
    close(total, ref['total_loss'], 'total loss')
    total.backward()
    check_gradients(model, ref['gradients'])


def test_rcnn_training_step_with_an_empty_image(monkeypatch):
    model = our_rcnn().train()
    calls = spy_dense_head(monkeypatch, model.rpn_head)
    losses = model.loss(*batch(common.EMPTY_IMAGES))
    check_rcnn_losses(calls, losses, RCNN['train_empty_image'])
    check_gradients(model, RCNN['train_empty_image']['gradients'])
