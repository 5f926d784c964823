"""Every shipped model config still gives its recorded numbers.

Losses, per-parameter gradient norms and predictions on fixed weights and
inputs (see ``tests/golden_values.py``, which also records them), compared
at 1e-6 relative.  The shapes configs and one COCO config per family run
in ``make test`` (about a minute on 2 cores); the other COCO configs
(ResNet-18, 256 px; 3-85 s each) are ``slow``.
"""
import json
import os.path as osp

import pytest

from golden_values import (compute, config_paths, differences, golden_file,
                           make_inputs)

CONFIGS = config_paths()
# COCO configs in `make test`: one per family (the cheapest that has its
# mechanism: two-stage refine, DINO, QFL + soft-NMS, DDQ FCN / R-CNN)
FAST_COCO = {
    'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
    'dino/dino-4scale_r50_8xb2-12e_coco.py',
    'co_detr/co-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py',
    'co_detr/co-dino-5scale_r50_8xb2-12e_coco.py',
    'ddq_fcn/ddq-fcn_r50_1x_coco.py',
    'ddq_rcnn/ddq-rcnn_r50_1x_coco.py',
}


def _params(configs):
    return [
        pytest.param(
            c,
            id=c,
            marks=()
            if c.startswith('shapes/') or c in FAST_COCO else pytest.mark.slow)
        for c in configs
    ]


def test_fast_configs_exist():
    assert FAST_COCO <= set(CONFIGS)


def test_every_model_config_has_golden_values():
    missing = [c for c in CONFIGS if not osp.exists(golden_file(c))]
    assert not missing, ('no golden values for these configs; record them '
                         'with `python tests/golden_values.py --only NAME`: '
                         f'{missing}')


@pytest.mark.parametrize('config', _params(CONFIGS))
def test_golden_values(config):
    with open(golden_file(config)) as f:
        expected = json.load(f)
    diff = differences(expected, compute(config))
    assert not diff, '\n'.join(diff[:30])


def test_differences_sees_one_changed_value():
    """The comparison is not blind: one loss, one gradient and one box
    moved by 1e-5 relative are each reported."""
    record = dict(
        losses={'loss_cls': 1.0},
        grad_norms={
            'w': 2.0,
            'b': None
        },
        predictions=[
            dict(
                count=1,
                labels=[0],
                scores=[0.5],
                bboxes=[[1.0, 2.0, 3.0, 4.0]])
        ])
    assert differences(record, json.loads(json.dumps(record))) == []
    for part, change in (('losses', {
            'loss_cls': 1.00001
    }), ('grad_norms', {
            'w': 2.00002,
            'b': None
    })):
        assert differences(record, dict(record, **{part: change}))
    moved = json.loads(json.dumps(record))
    moved['predictions'][0]['bboxes'][0][2] = 3.00003
    assert differences(record, moved)
    assert differences(record, dict(record, grad_norms={'w': 2.0, 'b': 0.1}))


def test_inputs_are_fixed():
    first, second = make_inputs('dino/x.py', 80), make_inputs('dino/x.py', 80)
    assert first[0].equal(second[0])
    assert first[1][1].gt_instances.bboxes.equal(
        second[1][1].gt_instances.bboxes)
