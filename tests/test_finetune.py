"""Fine-tuning on a dataset with another class count; num_classes errors;
the test-time score threshold."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config

from conftest import REPO_ROOT, run_tool
from detr_testing import build, dino_cfg, make_batch, predict
from projects_detr_plus.models.compat.finetune import class_counts

METHODS = [
    'dino', 'deformable-detr', 'deformable-detr-refine-twostage',
    'h-deformable-detr', 'group-dino', 'h-dino', 'co-dino', 'ddq-detr'
]


def _shapes_model(method, num_classes):
    cfg = Config.fromfile(
        osp.join(REPO_ROOT, 'configs/shapes', f'{method}-tiny_shapes.py'))
    cfg.model.bbox_head.num_classes = num_classes
    torch.manual_seed(num_classes)
    return build(cfg.model)


@pytest.mark.parametrize('method', METHODS)
def test_other_class_count_loads_all_but_class_weights(method):
    """torch's non-strict load raises on any shape mismatch: it goes
    through only because the detector drops the class-dependent ones."""
    source = _shapes_model(method, 6).state_dict()
    model = _shapes_model(method, 3)
    initial = copy.deepcopy(model.state_dict())
    missing, unexpected = model.load_state_dict(source, strict=False)
    assert not unexpected
    kept_init = []
    for key, value in model.state_dict().items():
        if source[key].shape == value.shape:
            assert torch.equal(value, source[key]), key
        else:
            assert torch.equal(value, initial[key]), key
            assert {3, 4, 12} & set(value.shape), key
            kept_init.append(key)
    assert sorted(missing) == sorted(kept_init)
    assert any('cls_branches' in key for key in kept_init)
    if method in ('dino', 'group-dino', 'h-dino', 'co-dino', 'ddq-detr'):
        assert 'dn_query_generator.label_embedding.weight' in kept_init


def test_only_class_count_changes_are_dropped():
    assert class_counts((3, 128), (80, 128), 3) == {80}
    assert class_counts((4, 128), (81, 128), 3) == {80}  # softmax
    assert class_counts((12, 128), (320, 128), 3) == {80}  # 4 x classes
    # num_classes=32: 128 = 4 x 32, but a query count change is not a
    # class count change
    assert not class_counts((20, 128), (30, 128), 32)
    model = build(dino_cfg(dims=128))
    source = build(dict(dino_cfg(dims=128), num_queries=20)).state_dict()
    with pytest.raises(RuntimeError, match='query_embedding.weight'):
        model.load_state_dict(source, strict=False)


def test_co_dino_inconsistent_num_classes_names_each_place():
    cfg = Config.fromfile(
        osp.join(REPO_ROOT, 'configs/shapes/co-dino-tiny_shapes.py'))
    rcnn, atss = cfg.model.branches  # the official order
    atss.aux_head.num_classes = 80
    rcnn.aux_head.roi_head.bbox_head.num_classes = 80
    with pytest.raises(ValueError) as error:
        build(cfg.model)
    message = str(error.value)
    assert 'bbox_head.num_classes=6' in message
    assert 'co_rcnn.aux_head.roi_head.bbox_head.num_classes=80' in message
    build_atss = copy.deepcopy(cfg.model)
    build_atss.branches[0].aux_head.roi_head.bbox_head.pop('num_classes')
    with pytest.raises(ValueError, match='co_atss.aux_head.num_classes=80'):
        build(build_atss)


def test_score_threshold_at_test():
    cfg = dino_cfg(dims=128)
    model = build(cfg)
    inputs, samples = make_batch()
    everything = predict(model, inputs, samples)
    assert all(len(s.pred_instances) == 30 for s in everything)
    scores = torch.cat([s.pred_instances.scores for s in everything])
    threshold = float(scores.median())
    model.test_cfg['score_thr'] = threshold
    kept = predict(model, inputs, samples)
    for full, part in zip(everything, kept):
        expected = full.pred_instances[full.pred_instances.scores > threshold]
        assert torch.equal(part.pred_instances.bboxes, expected.bboxes)
        assert torch.equal(part.pred_instances.scores, expected.scores)
    assert 0 < sum(len(s.pred_instances) for s in kept) < len(scores)


def test_finetune_six_class_checkpoint_into_three_classes(tmp_path):
    """tools/train.py: 2 iterations on 6 classes, then 2 iterations of a
    3-class model (a user's dataset: the first three shapes) from that
    checkpoint."""
    small = [
        'train_dataloader.batch_size=2',
        'train_dataloader.dataset.num_images=8',
        'val_dataloader.dataset.num_images=4',
        'test_dataloader.dataset.num_images=4', 'train_cfg.max_iters=2',
        'default_hooks.logger.interval=1'
    ]
    base = osp.join(REPO_ROOT, 'configs/shapes/dino-tiny_shapes.py')
    run_tool([
        osp.join(REPO_ROOT, 'tools/train.py'), base, '--work-dir',
        str(tmp_path / 'six'), '--cfg-options', *small
    ],
             cwd=tmp_path)
    checkpoint = tmp_path / 'six' / 'iter_2.pth'
    assert checkpoint.exists()
    config = tmp_path / 'three_classes.py'
    config.write_text(
        f"_base_ = '{base}'\n"
        "metainfo = dict(classes=('circle', 'square', 'triangle'))\n"
        "model = dict(bbox_head=dict(num_classes=3))\n"
        "train_dataloader = dict(dataset=dict(metainfo=metainfo))\n"
        "val_dataloader = dict(dataset=dict(metainfo=metainfo))\n"
        "test_dataloader = val_dataloader\n"
        f"load_from = '{checkpoint}'\n")
    proc = run_tool([
        osp.join(REPO_ROOT, 'tools/train.py'),
        str(config), '--work-dir',
        str(tmp_path / 'three'), '--cfg-options', *small
    ],
                    cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert ('Checkpoint for 6 classes: 9 class-dependent weights keep their '
            'initialisation (num_classes=3)') in log
    assert 'dn_query_generator.label_embedding.weight (6, 128)->(3, 128)' \
        in log
    assert 'Iter(train) [2/2]' in log and 'coco/bbox_mAP' in log
    fine_tuned = torch.load(
        tmp_path / 'three' / 'iter_2.pth', weights_only=False)['state_dict']
    assert fine_tuned['bbox_head.cls_branches.0.weight'].shape == (3, 128)


def test_denoising_or_branch_num_classes_is_an_error_naming_it():
    cfg = dino_cfg(dims=128)
    cfg['dn_cfg']['num_classes'] = 80
    with pytest.raises(
            ValueError,
            match=r'dn_cfg: num_classes=80 is set by '
            r'the detector \(num_classes=5'):
        build(cfg)
    cfg = dino_cfg(
        dims=128,
        branches=(dict(
            type='HybridMatchingBranch', num_queries=20, num_classes=80), ))
    with pytest.raises(ValueError, match='HybridMatchingBranch: num_classes'):
        build(cfg)
