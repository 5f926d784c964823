"""Co-Deformable-DETR's query head against Sense-X/Co-DETR's, by execution.

The reference (``co_deformable_reference.py``, a subprocess: it runs the
authors' ``CoDeformDETRHead`` and ``CoDeformableDetrTransformer`` on mmdet
2.28.2, see its doc) builds the official R50 head made small (2 encoder and
3 decoder layers, FFN 512, 30 queries; 4 levels, width 256, 80 classes,
losses, costs and weights as shipped), random weights, and saves them with
what it computes on two batches.  Here our Co-Deformable-DETR
(``configs/co_detr/co-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py``
at the same sizes) loads those weights through the official-checkpoint
converter (``convert_official_co_detr``, so the Sense-X key layout of
Co-Deformable-DETR is tested too) and takes the same inputs: the neck
output (``extract_feat`` returns the reference's), the ground truth, and
the auxiliary heads' candidates (each branch's ``aux_head`` returns the
reference's ``pos_coords``; for ATSS our ``features_at_priors`` picks the
candidates' features from our encoder pyramid, as the official
``get_aux_targets`` does).  fp32, MSDeformAttn on its PyTorch path,
``randperm`` a rotation on both sides (``co_dino_training_reference``).

Compared:

* the encoder pyramid handed to the auxiliary heads (4 levels + the
  stride-2 ``downsample`` level), 1e-5;
* every loss term (30 per batch): one-to-one per decoder layer, the
  two-stage proposals' (binary classification), the customized queries'
  of each auxiliary head per layer, at 1e-5 relative;
* the gradients of every parameter per loss group (one-to-one, R-CNN
  queries, ATSS queries) and of their sum (162 parameters): 1e-5
  relative (the norm of the difference against the reference's), also
  before the deformable sampling points, where Co-DINO's comparison needs
  1e-2 (``test_co_dino_training_parity.py`` says why: no sampling point of
  these inputs lies that close to a pixel centre line);
* the customized queries (anchors, labels, positive targets, per image
  as sets);
* ``predict``: the top-100 boxes, scores and labels, 1e-5.

Observed (2026-12-08, this machine): terms within 1.9e-7, gradients
within 6.5e-7 after the sampling points and 5.2e-6 before them (the
worst: ``head_pos_embed``); the top-100 predictions equal at the test's
tolerance (scores 1e-5 relative, boxes 1e-4 px, labels exact).  Each of these
changes of ours fails the comparison: the customized queries' loss
weight 1.1, ``min_queries`` 8, look forward twice or mixed selection
off, the head embedding or the candidate feature left out of the
queries, box losses on the padding negatives, no classification loss on
them.

Not compared here: the backbone, neck and the auxiliary heads' own losses
(the same mmdet heads as Co-DINO's, compared with mmdet's port in
``test_co_dino_training_parity.py``).  Kept, documented difference: the
customized queries' first reference boxes are the anchors clamped to the
image (``collaborative.py``); the reference runs with that applied, and
once with its own anchors to bound the difference
(:func:`test_the_anchor_deviation_is_small`).
"""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.structures import InstanceData

import co_deformable_reference as ref
import co_dino_training_reference as training
import mmdet2_loader
from conftest import REPO_ROOT, run_tool
from test_co_dino_training_parity import (RTOL, _recording,
                                          assert_same_queries, gradient_errors,
                                          summed_grads)

CONFIG = osp.join(
    REPO_ROOT,
    'configs/co_detr/co-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py')
AUX = ('co_rcnn', 'co_atss')
LAYERS = [f'd{i}.' for i in range(ref.SMALL['dec_layers'] - 1)] + ['']
KINDS = ('cls', 'bbox', 'iou')
TERMS = ([f'{d}loss_{k}' for d in LAYERS
          for k in KINDS] + [f'enc_loss_{k}' for k in KINDS] + [
              f'{d}loss_{k}_aux{j}' for j in range(len(AUX)) for d in LAYERS
              for k in KINDS
          ])


def our_term(key):
    """Our loss key of an official one: ``d0.loss_cls_aux1`` ->
    ``d0.co_atss_loss_cls``."""
    if '_aux' not in key:
        return key
    key, index = key.rsplit('_aux', 1)
    layer, _, kind = key.rpartition('.')
    return f'{layer}{"." if layer else ""}{AUX[int(index)]}_{kind}'


def assert_same_gradients(ours, theirs, names):
    errors = gradient_errors(ours, theirs, names)
    bad = [(f'{e:.1e}', n) for e, n in errors if not e <= RTOL]
    assert not bad, f'{len(bad)} of {len(errors)} parameters: {bad[:12]}'


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def theirs(tmp_path_factory):
    if not osp.isdir(ref.reference_dir()):
        pytest.skip(f'no Sense-X/Co-DETR copy at {ref.reference_dir()} '
                    '(set SENSE_X_CO_DETR to one)')
    wheel = mmdet2_loader.find_wheel(download=True, repo_root=REPO_ROOT)
    if wheel is None:
        pytest.skip('no mmdet 2.28.2 wheel (pip download mmdet==2.28.2 '
                    '--no-deps -d ../shared/wheelhouse, or set MMDET2_WHEEL)')
    out = tmp_path_factory.mktemp('co_deformable')
    run_tool([
        osp.join(REPO_ROOT, 'tests/co_deformable_reference.py'),
        str(out), '--reference',
        ref.reference_dir(), '--wheel', wheel
    ],
             cwd=REPO_ROOT,
             timeout=600)
    found = torch.load(out / 'co_deformable.pth', weights_only=False)
    for case in ref.CASES:
        found[case]['grads'] = {
            group: official_names(grads)
            for group, grads in found[case]['grads'].items()
        }
    return found


def official_names(grads):
    """The head's gradients under the checkpoint's names (``query_head.``,
    ``head_pos_embed`` split per auxiliary head as our branches hold it)."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        split_head_pos_embed
    named = {f'query_head.{k}': v for k, v in grads.items()}
    split_head_pos_embed(named)
    return named


def our_config():
    """Our Co-Deformable-DETR at the reference's sizes."""
    cfg = Config.fromfile(CONFIG).model
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [128, 256, 512]
    cfg.num_queries = ref.SMALL['num_query']
    cfg.encoder.num_layers = ref.SMALL['enc_layers']
    cfg.decoder.num_layers = ref.SMALL['dec_layers']
    for part in (cfg.encoder, cfg.decoder):
        part.layer_cfg.ffn_cfg.feedforward_channels = ref.SMALL['ffn']
    return cfg


@pytest.fixture(scope='module')
def ours(theirs):
    """Ours with the reference's weights: every official key loads, and
    every weight of ours outside the backbone, neck and auxiliary heads
    (which the reference does not have) comes from it."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    model = MODELS.build(our_config())
    state_dict = dict(theirs['state_dict'])
    # the official head without a backbone would not load (the converter
    # checks the backbone): ours, unused here (``extract_feat`` is given)
    state_dict.update({
        k: v
        for k, v in model.state_dict().items()
        if k.startswith(('backbone.', 'neck.'))
    })
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected
    assert [k for k in missing if '.aux_head.' not in k] == []
    return model.train()


@pytest.fixture(scope='module')
def names(ours, theirs):
    """Official parameter name -> ours."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        branch_kinds, official_key_map, split_head_pos_embed)
    state_dict = dict(theirs['state_dict'])
    split_head_pos_embed(state_dict)
    mapping, unmapped = official_key_map(list(state_dict), branch_kinds(ours))
    assert not unmapped
    return mapping


def _samples(inputs):
    metas = [dict(m) for m in inputs['metas']]
    batch = dict(inputs, metas=metas)
    return training.data_samples(batch)


class _GivenCandidates:
    """An ``aux_head.loss_and_candidates`` that returns the reference's
    candidates (and records the pyramid it was given)."""

    def __init__(self, pos_coords, seen):
        self.pos_coords, self.seen = pos_coords, seen

    def __call__(self, pyramid, samples, with_feats=False):
        from projects_detr_plus.models.aux_heads.atss import features_at_priors
        self.seen.append(pyramid)
        coords, labels, targets = self.pos_coords[:3]
        if self.pos_coords[-1] == 'rcnn':
            feats = self.pos_coords[3]
        else:  # ATSS: one anchor per location
            feats = features_at_priors(pyramid, [1] * len(pyramid))
        candidates = []
        for i in range(len(coords)):
            c = InstanceData(
                priors=coords[i], bboxes=targets[i], labels=labels[i])
            if with_feats:
                c.feats = feats[i]
            candidates.append(c)
        return {}, candidates


def our_step(model, inputs, max_queries):
    """Our loss dict, group gradients, customized-query targets and
    pyramid on the reference's inputs."""
    from projects_detr_plus.ops import force_pytorch
    pyramids, targets = [], []
    model.extract_feat = lambda images: tuple(inputs['feats'])
    for branch, pos_coords in zip(model.extra_branches, inputs['pos_coords']):
        branch.max_queries = max_queries
        branch.aux_head.loss_and_candidates = _GivenCandidates(
            pos_coords, pyramids)
        branch._queries_targets = _recording(branch, targets)
    images = torch.zeros(
        len(inputs['metas']), 3, *inputs['metas'][0]['batch_input_shape'])
    try:
        with ref.rotations(), force_pytorch():
            losses = training.summed(model.loss(images, _samples(inputs)))
    finally:
        del model.extract_feat
        for branch in model.extra_branches:
            del branch.aux_head.loss_and_candidates, branch._queries_targets
    inverse = {our_term(k): k for k in TERMS}
    grads = training.group_gradients(
        losses, lambda key: ref.loss_group(inverse.get(key, key)),
        model.named_parameters())
    return dict(
        losses={
            k: v.detach()
            for k, v in losses.items()
        },
        grads=grads,
        pyramid=[level.detach() for level in pyramids[0]],
        aux_targets={t.pop('name'): t
                     for t in targets})


@pytest.fixture(scope='module')
def steps(ours, theirs):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = our_step(ours, theirs[case],
                                   ref.CASES[case]['max_pos'])
        return cache[case]

    return get


def test_loss_dicts_have_the_same_terms(theirs, steps):
    for case in ref.CASES:
        assert sorted(theirs[case]['losses']) == sorted(TERMS)
        assert sorted(steps(case)['losses']) == sorted(
            our_term(k) for k in TERMS)


@pytest.mark.parametrize('case', list(ref.CASES))
def test_encoder_pyramid(theirs, steps, case):
    for ours, official in zip(
            steps(case)['pyramid'], theirs[case]['pyramid'], strict=True):
        torch.testing.assert_close(ours, official, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize('case', list(ref.CASES))
@pytest.mark.parametrize('term', TERMS)
def test_loss_term(theirs, steps, case, term):
    expected = theirs[case]['losses'][term]
    actual = steps(case)['losses'][our_term(term)]
    torch.testing.assert_close(
        actual.reshape(expected.shape),
        expected,
        rtol=RTOL,
        atol=0,
        msg=lambda m: f'{our_term(term)}: {m}')


@pytest.mark.parametrize('case', list(ref.CASES))
@pytest.mark.parametrize('group', ref.GROUPS)
def test_gradients_of_each_loss_group(theirs, steps, names, case, group):
    assert_same_gradients(
        steps(case)['grads'].get(group, {}),
        theirs[case]['grads'].get(group, {}), names)


@pytest.mark.parametrize('case', list(ref.CASES))
def test_every_shared_parameter_gets_the_same_gradient(theirs, steps, names,
                                                       case):
    reached = summed_grads(steps(case)['grads'])
    theirs_reached = summed_grads(theirs[case]['grads'])
    assert {names[n] for n in theirs_reached} == set(reached)
    assert_same_gradients(reached, theirs_reached, names)


@pytest.mark.parametrize('case', list(ref.CASES))
@pytest.mark.parametrize('index,branch', list(enumerate(AUX)))
def test_customized_queries_are_the_same(theirs, steps, case, index, branch):
    assert_same_queries(theirs[case]['aux_targets'][index],
                        steps(case)['aux_targets'][branch])


@pytest.mark.parametrize('case', list(ref.CASES))
def test_predictions(ours, theirs, case):
    from projects_detr_plus.ops import force_pytorch
    inputs = theirs[case]
    images = torch.zeros(
        len(inputs['metas']), 3, *inputs['metas'][0]['batch_input_shape'])
    ours.eval()
    ours.extract_feat = lambda images: tuple(inputs['feats'])
    try:
        with torch.no_grad(), force_pytorch():
            results = ours.predict(images, _samples(inputs), rescale=False)
    finally:
        del ours.extract_feat
        ours.train()
    for result, (boxes, labels) in zip(
            results, inputs['predictions'], strict=True):
        pred = result.pred_instances
        torch.testing.assert_close(
            pred.scores, boxes[:, 4], rtol=RTOL, atol=1e-6)
        assert torch.equal(pred.labels, labels)
        torch.testing.assert_close(
            pred.bboxes, boxes[:, :4], rtol=RTOL, atol=1e-4)


def _outside(coords, eps=1e-5):
    """Whether normalised cxcywh anchors leave [eps, 1 - eps]."""
    return bool(((coords < eps) | (coords > 1 - eps)).any())


@pytest.mark.parametrize('case', list(ref.CASES))
def test_the_anchor_deviation_is_small(theirs, case):
    """With the official raw anchors only ATSS-query terms move, only
    where some anchor leaves [0, 1] (in ``padded`` some are larger than the
    smaller image), each by < 1e-2 relative."""
    clamped = theirs[case]['losses']
    raw = theirs[case]['losses_raw_anchors']
    changed = {
        k: float(
            (raw[k] - clamped[k]).abs() / clamped[k].abs().clamp(min=1e-12))
        for k in clamped
        if not torch.allclose(raw[k], clamped[k], rtol=RTOL, atol=0)
    }
    outside = _outside(theirs[case]['aux_targets'][1]['coords'])
    assert outside or not changed
    if case == 'padded':
        assert changed, 'the padded batch should exercise the deviation'
    assert not _outside(theirs[case]['aux_targets'][0]['coords'])
    assert all('aux1' in k for k in changed), changed
    assert max(changed.values(), default=0) < 1e-2, changed


def test_cases_exercise_subsets_and_padding(theirs):
    """``padded`` pads each head's queries with negatives;
    ``few_queries`` keeps ``max_pos`` of an image's positives (the
    randperm subset)."""
    for targets in theirs['padded']['aux_targets']:
        assert (targets['labels'] == ref.NUM_CLASSES).any()
    for targets in theirs['few_queries']['aux_targets']:
        positives = (targets['labels'] < ref.NUM_CLASSES).sum(1)
        assert int(positives.max()) == ref.CASES['few_queries']['max_pos']
