"""Official Co-DINO checkpoints load into DETR+'s Co-DINO and predict the same.

The reference is mmdet's ``projects/CO-DETR`` (a copy outside the package,
``$CO_DETR_REFERENCE``), built in a subprocess (``co_detr_reference.py``):
it registers its modules with ``force=True`` and must not share a process
with DETR+.  It saves the official R50 Co-DINO-5scale with random, perturbed
weights as a checkpoint in the official layout, and its predictions on two
batches (one padded).  Here our Co-DINO is built from its config as shipped
(no pretrained backbone), loads that checkpoint through mmengine's
``load_checkpoint`` strictly, and predicts the same batches: labels equal,
boxes and scores within 1e-4, without NMS and with the official soft-NMS.
"""
import importlib.util
import os.path as osp

import pytest
import torch
from mmengine.config import Config, ConfigDict
from mmengine.runner import load_checkpoint
from mmengine.runner.checkpoint import load_state_dict

from co_detr_reference import BATCHES
from co_detr_reference import CONFIG as REFERENCE_CONFIG
from co_detr_reference import NMS, reference_dir
from conftest import REPO_ROOT, run_tool

CONFIG = osp.join(REPO_ROOT,
                  'configs/co_detr/co-dino-5scale_r50_8xb2-12e_coco.py')
CONVERTER = osp.join(REPO_ROOT, 'tools/convert_co_detr_checkpoint.py')
# the official checkpoint layout: a few keys of each kind
RCNN_KEYS = ('rpn_head.rpn_cls.weight', 'roi_head.0.bbox_head.fc_cls.weight')
ATSS_KEYS = ('bbox_head.0.atss_cls.weight', )
CONTENT_KEYS = tuple(f'query_head.transformer.aux_pos_trans{norm}.{j}.weight'
                     for j in (0, 1) for norm in ('', '_norm'))


def load_pre_hooks(model):
    """The detector's load_state_dict pre-hooks, unwrapped, in order."""
    return [
        getattr(h, 'hook', h)
        for h in model._load_state_dict_pre_hooks.values()
    ]


def with_official_hook(model):
    """Register the conversion as the first pre-hook unless the detector
    does (until ``QueryBranchDetector.build_branches`` does it)."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        convert_official_co_detr
    if convert_official_co_detr not in load_pre_hooks(model):
        handle = model.register_load_state_dict_pre_hook(
            convert_official_co_detr)
        model._load_state_dict_pre_hooks.move_to_end(handle.id, last=False)
    return model


def build_ours(num_classes=None):
    """Our Co-DINO from its config, no pretrained backbone, no init."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    cfg = Config.fromfile(CONFIG)
    cfg.model.backbone.init_cfg = None
    if num_classes is not None:
        cfg.model.bbox_head.num_classes = num_classes
    return MODELS.build(cfg.model)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
    """The reference's checkpoint path and outputs."""
    if not osp.isdir(reference_dir()):
        pytest.skip(f'no mmdet projects/CO-DETR copy at {reference_dir()} '
                    '(set CO_DETR_REFERENCE to one)')
    out = tmp_path_factory.mktemp('co_detr_reference')
    run_tool([
        osp.join(REPO_ROOT, 'tests/co_detr_reference.py'),
        str(out), '--reference',
        reference_dir()
    ],
             cwd=REPO_ROOT,
             timeout=600)
    outputs = torch.load(out / 'reference.pth', weights_only=False)
    return dict(checkpoint=str(out / 'co_dino_official.pth'), outputs=outputs)


def converter():
    """``tools/convert_co_detr_checkpoint.py`` as a module."""
    spec = importlib.util.spec_from_file_location('convert_co_detr', CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def built():
    """Our Co-DINO as built, and its load_state_dict pre-hooks then."""
    model = build_ours()
    return model, load_pre_hooks(model)


@pytest.fixture(scope='module')
def ours(built, official):
    """Our Co-DINO with the official checkpoint loaded strictly."""
    model = with_official_hook(built[0])
    load_checkpoint(
        model, official['checkpoint'], map_location='cpu', strict=True)
    return model.eval()


@pytest.fixture(scope='module')
def official_state_dict(official):
    return torch.load(
        official['checkpoint'], map_location='cpu',
        weights_only=False)['state_dict']


@pytest.fixture(scope='module')
def predictions(ours, official):
    """Our predictions per (batch, NMS), computed once."""
    cache = {}

    def get(batch, nms):
        if (batch, nms) not in cache:
            cache[batch, nms] = predict(ours, official['outputs'][batch],
                                        NMS[nms])
        return cache[batch, nms]

    return get


@torch.no_grad()
def predict(model, batch, nms):
    from mmdet.structures import DetDataSample
    model.test_cfg = ConfigDict(max_per_img=300, nms=nms)
    samples = [DetDataSample(metainfo=dict(m)) for m in batch['metas']]
    samples = model.predict(batch['inputs'], samples, rescale=True)
    return [{
        key: getattr(s.pred_instances, key)
        for key in ('bboxes', 'scores', 'labels')
    } for s in samples]


def assert_same_detections(ours, theirs):
    """Labels equal, scores within 1e-4, boxes (original image pixels)
    within 1e-4 plus a float32 rounding of 1e-6 relative."""
    assert len(ours['labels']) == len(theirs['labels'])
    mismatch = (ours['labels'] != theirs['labels']).nonzero()[:, 0]
    assert not len(mismatch), f'labels differ at {mismatch.tolist()[:10]}'
    torch.testing.assert_close(
        ours['scores'], theirs['scores'], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        ours['bboxes'], theirs['bboxes'], atol=1e-4, rtol=1e-6)


def test_detector_converts_official_checkpoints_first(built):
    """``build_branches`` registers the conversion before
    ``drop_class_dependent_mismatches`` (which reads our key names)."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        convert_official_co_detr
    from projects_detr_plus.models.compat.finetune import \
        drop_class_dependent_mismatches
    hooks = built[1]
    assert convert_official_co_detr in hooks, 'pre-hook not registered'
    assert hooks.index(convert_official_co_detr) < hooks.index(
        drop_class_dependent_mismatches)


def test_finetuning_from_an_official_checkpoint(official, official_state_dict):
    """3 classes: the class-dependent weights (found under our names, so
    after the conversion) keep their initialisation, the rest loads."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        RCNN, branch_kinds)
    model = with_official_hook(build_ours(num_classes=3))
    kinds = branch_kinds(model)
    rcnn = f'extra_branches.{kinds.index(RCNN)}.aux_head.'
    atss = f'extra_branches.{kinds.index("atss")}.aux_head.'
    init = {k: v.clone() for k, v in model.state_dict().items()}
    load_checkpoint(model, official['checkpoint'], map_location='cpu')
    own = model.state_dict()
    for key in ('bbox_head.cls_branches.6.weight',
                'dn_query_generator.label_embedding.weight',
                rcnn + 'roi_head.bbox_head.fc_cls.weight',
                atss + 'atss_cls.weight'):
        assert torch.equal(own[key], init[key]), key
    for official_key, key in (
        ('query_head.transformer.decoder.layers.5.norms.2.weight',
         'decoder.layers.5.norms.2.weight'),
        ('query_head.reg_branches.6.4.weight',
         'bbox_head.reg_branches.6.4.weight'), ('bbox_head.0.atss_reg.weight',
                                                atss + 'atss_reg.weight')):
        assert torch.equal(own[key], official_state_dict[official_key]), key


def test_every_official_weight_lands_in_one_of_ours(ours, official_state_dict):
    """One to one: each of our weights holds one official weight."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        branch_kinds, official_key_map)
    mapping, unmapped = official_key_map(
        list(official_state_dict), branch_kinds(ours))
    assert not unmapped
    own = ours.state_dict()
    assert sorted(mapping.values()) == sorted(own)
    for old, new in mapping.items():
        assert torch.equal(own[new], official_state_dict[old]), (old, new)


def test_config_has_the_official_test_time_nms(official):
    """Top 300, then soft-NMS 0.8 (official ``test_cfg[0]``)."""
    official_cfg = Config.fromfile(
        osp.join(reference_dir(), REFERENCE_CONFIG),
        import_custom_modules=False)
    assert Config.fromfile(CONFIG).model.test_cfg == \
        official_cfg.model.test_cfg[0]


# the padded batch's second image: every top box comes from a padding
# proposal (reference ~1), where the box decoding's inverse_sigmoid eps
# matters (official 1e-3: DINOHeadPlus.reference_eps)
CASES = [
    pytest.param(batch, image, nms, id=f'{batch}-image{image}-{nms}')
    for batch, shapes in BATCHES.items() for image in range(len(shapes))
    for nms in NMS
]


@pytest.mark.parametrize('batch,image,nms', CASES)
def test_predictions_equal_official(official, predictions, batch, image, nms):
    theirs = official['outputs'][batch]['predictions'][nms][image]
    assert_same_detections(predictions(batch, nms)[image], theirs)


@torch.no_grad()
def test_customized_query_content_is_the_official_heads(official, ours):
    """Each branch's content map is the official ``aux_pos_trans`` (+
    norm) of its head's kind (R-CNN: aux index 0, ATSS: 1), applied to the
    official sine embedding, which ``CollaborativeBranch.make_queries`` takes
    from ``DeformableDETR.get_proposal_pos_embed``."""
    from mmdet.models.detectors import DeformableDETR
    from mmdet.models.layers.transformer import inverse_sigmoid

    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        RCNN, branch_kinds)
    anchors = official['outputs']['aux_anchors']
    sine = DeformableDETR.get_proposal_pos_embed(
        inverse_sigmoid(anchors), num_pos_feats=ours.embed_dims // 2)
    for branch, kind in zip(ours.extra_branches, branch_kinds(ours)):
        theirs = official['outputs']['aux_content'][0 if kind == RCNN else 1]
        torch.testing.assert_close(
            branch.content(sine), theirs, atol=1e-5, rtol=0, msg=branch.name)


def test_reference_predictions_are_codetr_predict(official):
    """The reference's NMS-free predictions are those of the whole
    ``CoDETR.predict``, which ``use_lsj=True`` leaves unchanged in mmdet's
    port (it writes into a copy of the metainfo)."""
    batch = official['outputs']['padded']
    for whole, part in zip(batch['codetr_predict'],
                           batch['predictions']['none']):
        for key in whole:
            assert torch.equal(whole[key], part[key]), key


def test_sense_x_label_embedding_key_loads(ours, official_state_dict):
    """Sense-X/Co-DETR keeps the denoising label embedding in the head
    (``query_head.label_embedding``; mmdet #11482)."""
    state_dict = dict(official_state_dict)
    weight = state_dict.pop('query_head.dn_generator.label_embedding.weight')
    state_dict['query_head.label_embedding.weight'] = weight + 1
    load_state_dict(ours, state_dict, strict=True)
    try:
        assert torch.equal(ours.dn_query_generator.label_embedding.weight,
                           weight + 1)
    finally:
        ours.dn_query_generator.label_embedding.weight.data.copy_(weight)


def test_unmappable_official_keys_are_named(built):
    model = with_official_hook(built[0])
    extra = 'query_head.transformer.pos_feats_trans.0.weight'
    state_dict = {
        k: v
        for k, v in model.state_dict().items() if k.startswith('backbone.')
    }
    state_dict.update({
        'query_head.cls_branches.0.weight': torch.zeros(80, 256),
        extra: torch.zeros(256, 256)
    })
    with pytest.raises(ValueError, match=extra.replace('.', r'\.')):
        model.load_state_dict(state_dict)


def test_a_backbone_that_does_not_fit_is_named(built):
    """Never a backbone left at its initialisation with a warning."""
    model = with_official_hook(built[0])
    backbone = {
        k: v
        for k, v in model.state_dict().items() if k.startswith('backbone.')
    }
    state_dict = dict(
        backbone, **{'query_head.cls_branches.0.weight': torch.zeros(80, 256)})
    del state_dict['backbone.layer4.2.conv3.weight']
    state_dict['backbone.conv1.weight'] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(
            ValueError,
            match=r'1 of \d+ backbone weights '
            r'missing \(backbone\.layer4\.2\.conv3\.weight\), 1 '
            r'of another shape \(backbone\.conv1\.weight\)'):
        model.load_state_dict(state_dict)


def test_own_layout_is_left_alone(built):
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        convert_official_co_detr
    state_dict = built[0].state_dict()
    before = list(state_dict.items())
    convert_official_co_detr(built[0], state_dict, '')
    assert list(state_dict.items()) == before


def test_prefixed_keys_are_renamed_under_their_prefix():
    """A detector inside another module sees ``{prefix}query_head.*``."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        convert_official_co_detr
    weight, other = torch.zeros(1), torch.ones(1)
    state_dict = {
        'det.query_head.cls_branches.0.weight': weight,
        'det.backbone.conv1.weight': weight,
        'head.x': other
    }
    detector = torch.nn.Module()  # with the two weights, shape (1, )
    for name in ('bbox_head.cls_branches.0', 'backbone.conv1'):
        module = detector
        for part in name.split('.'):
            module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.weight = torch.nn.Parameter(torch.zeros(1))
    convert_official_co_detr(detector, state_dict, 'det.')
    assert list(state_dict) == [
        'det.bbox_head.cls_branches.0.weight', 'det.backbone.conv1.weight',
        'head.x'
    ]


@pytest.mark.parametrize('kinds', [('rcnn', 'atss'), ('atss', None, 'rcnn'),
                                   ('fcos', 'atss', None, 'rcnn')])
def test_auxiliary_heads_map_by_kind_not_by_order(kinds):
    """Official aux index: RoI heads first, then one-stage heads."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        official_key_map
    rcnn, atss = kinds.index('rcnn'), kinds.index('atss')
    mapping, unmapped = official_key_map(
        list(RCNN_KEYS + ATSS_KEYS + CONTENT_KEYS), list(kinds))
    assert not unmapped
    assert mapping == {
        'rpn_head.rpn_cls.weight':
        f'extra_branches.{rcnn}.aux_head.rpn_head.rpn_cls.weight',
        'roi_head.0.bbox_head.fc_cls.weight':
        f'extra_branches.{rcnn}.aux_head.roi_head.bbox_head.fc_cls.weight',
        'bbox_head.0.atss_cls.weight':
        f'extra_branches.{atss}.aux_head.atss_cls.weight',
        CONTENT_KEYS[0]: f'extra_branches.{rcnn}.content.0.weight',
        CONTENT_KEYS[1]: f'extra_branches.{rcnn}.content.1.weight',
        CONTENT_KEYS[2]: f'extra_branches.{atss}.content.0.weight',
        CONTENT_KEYS[3]: f'extra_branches.{atss}.content.1.weight'
    }


def test_one_stage_heads_map_by_their_own_kind():
    """Official ATSS then FCOS (``bbox_head.0``, ``.1``; aux indices 1, 2
    after the RoI head) into a config that lists FCOS first: each keeps
    its own weights, ``aux_pos_trans`` included."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        official_key_map
    names = [
        'bbox_head.0.atss_cls.weight', 'bbox_head.0.cls_convs.0.w',
        'bbox_head.1.conv_centerness.weight', 'bbox_head.1.cls_convs.0.w',
        'roi_head.0.bbox_head.fc_cls.weight',
        'query_head.transformer.aux_pos_trans.1.weight',
        'query_head.transformer.aux_pos_trans.2.weight'
    ]
    mapping, unmapped = official_key_map(names, ['fcos', 'rcnn', 'atss'])
    assert not unmapped
    assert mapping['bbox_head.0.atss_cls.weight'] == \
        'extra_branches.2.aux_head.atss_cls.weight'
    assert mapping['bbox_head.0.cls_convs.0.w'] == \
        'extra_branches.2.aux_head.cls_convs.0.w'
    assert mapping['bbox_head.1.conv_centerness.weight'] == \
        'extra_branches.0.aux_head.conv_centerness.weight'
    assert mapping['query_head.transformer.aux_pos_trans.1.weight'] == \
        'extra_branches.2.content.0.weight'
    assert mapping['query_head.transformer.aux_pos_trans.2.weight'] == \
        'extra_branches.0.content.0.weight'
    # an official FCOS head has no FCOS branch to go to
    _, unmapped = official_key_map(names, ['rcnn', 'atss', 'atss'])
    assert unmapped == [
        'bbox_head.1.cls_convs.0.w', 'bbox_head.1.conv_centerness.weight',
        'query_head.transformer.aux_pos_trans.2.weight'
    ]


def test_heads_without_branch_of_their_kind_are_unmapped():
    from projects_detr_plus.models.compat.co_detr_checkpoints import \
        official_key_map
    _, unmapped = official_key_map(list(RCNN_KEYS + ATSS_KEYS), ['atss'])
    assert unmapped == sorted(RCNN_KEYS)
    _, unmapped = official_key_map(['rpn_head.rpn_cls.weight'],
                                   ['rcnn', 'rcnn'])
    assert unmapped == ['rpn_head.rpn_cls.weight']  # one RPN, two branches


def test_branch_kinds_from_config_match_the_detector(built):
    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        branch_kinds, branch_kinds_from_config)
    branches = Config.fromfile(CONFIG).model.branches
    assert branch_kinds_from_config(branches) == branch_kinds(built[0])


def test_converter_writes_our_layout(official, ours, tmp_path, capsys):
    out = tmp_path / 'ours.pth'
    converter().main([official['checkpoint'], str(out), '--verify'])
    report = capsys.readouterr().out
    assert 'unmapped:  0' in report and 'verified' in report, report
    state_dict = torch.load(out, weights_only=False)['state_dict']
    expected = ours.state_dict()
    assert sorted(state_dict) == sorted(expected)
    for key, value in state_dict.items():
        assert torch.equal(value, expected[key]), key


def test_converter_names_unmapped_keys(tmp_path, capsys):
    src, dst = tmp_path / 'official.pth', tmp_path / 'ours.pth'
    extra = 'query_head.transformer.pos_feats_trans.0.weight'
    torch.save(
        dict(
            state_dict={
                'query_head.cls_branches.0.weight': torch.zeros(1),
                extra: torch.zeros(1)
            }), src)
    tool = converter()
    with pytest.raises(SystemExit, match='--drop-unmapped'):
        tool.main([str(src), str(dst)])
    assert extra in capsys.readouterr().out and not dst.exists()
    tool.main([str(src), str(dst), '--drop-unmapped'])
    assert f'{extra}\n' in capsys.readouterr().out
    assert list(torch.load(dst, weights_only=False)['state_dict']) == [
        'bbox_head.cls_branches.0.weight'
    ]


def test_co_deformable_detr_official_names():
    """Sense-X Co-Deformable-DETR's own modules: the two-stage positional
    projection, mixed selection's content queries, the candidate-feature
    maps and the per-head positional embedding table, a row per branch
    (RoI heads first)."""
    from projects_detr_plus.models.compat.co_detr_checkpoints import (
        official_key_map, split_head_pos_embed)
    table = torch.tensor([[0.5], [-0.25]])
    state_dict = {
        'query_head.transformer.head_pos_embed.weight': table,
        'query_head.transformer.pos_trans.weight': torch.zeros(1),
        'query_head.transformer.pos_trans_norm.bias': torch.zeros(1),
        'query_head.query_embedding.weight': torch.zeros(1),
        'query_head.transformer.pos_feats_trans.0.weight': torch.zeros(1),
        'query_head.transformer.pos_feats_norm.1.bias': torch.zeros(1),
        'query_head.transformer.aux_pos_trans_norm.1.weight': torch.zeros(1),
    }
    split_head_pos_embed(state_dict)
    mapping, unmapped = official_key_map(list(state_dict), ['atss', 'rcnn'])
    assert not unmapped
    assert {
        mapping[k]: v
        for k, v in state_dict.items()
    } == {
        'extra_branches.1.head_embedding':
        table[0],
        'extra_branches.0.head_embedding':
        table[1],
        'pos_trans_fc.weight':
        state_dict['query_head.transformer.pos_trans.weight'],
        'pos_trans_norm.bias':
        state_dict['query_head.transformer.pos_trans_norm.bias'],
        'query_embedding.weight':
        state_dict['query_head.query_embedding.weight'],
        'extra_branches.1.feat_proj.0.weight':
        state_dict['query_head.transformer.pos_feats_trans.0.weight'],
        'extra_branches.0.feat_proj.1.bias':
        state_dict['query_head.transformer.pos_feats_norm.1.bias'],
        'extra_branches.0.content.1.weight':
        state_dict['query_head.transformer.aux_pos_trans_norm.1.weight'],
    }
    _, unmapped = official_key_map(
        list(state_dict), ['atss', 'rcnn'],
        targets={'extra_branches.0.head_embedding'})
    assert 'query_head.transformer.pos_feats_trans.0.weight' in unmapped
