"""Align-DETR, Stable-DINO and MS-DETR on every query detector (DINO,
two-stage Deformable DETR, DDQ-DETR) and in the combinations issue #31
names (Co-DINO + Stable-DINO's loss, DDQ-DETR + Align-DETR's matching,
H-Deformable-DETR + MS-DETR): each builds from a config line, trains (finite
losses, gradients), and predicts as its base model with the same weights.
"""
import copy

import pytest
import torch

from detr_testing import (build, ddq_cfg, deformable_detr_cfg, dino_cfg,
                          losses_with_seed, make_batch, predict)


def _align(cfg, layers):
    cfg['bbox_head']['loss_cls'] = dict(type='IABCELoss')
    cfg.setdefault('branches', []).append(
        dict(type='AlignDETRBranch', match_numbers=(2, ) * layers + (1, )))


def _stable(cfg, layers):
    cfg['bbox_head']['loss_cls'] = dict(
        type='PositionSupervisedLoss', loss_weight=6.0)
    cfg['train_cfg']['assigner']['match_costs'][0] = dict(
        type='PositionModulatedFocalCost', weight=2.0)


def _ms_detr(cfg, layers):
    cfg.setdefault('branches',
                   []).append(dict(type='MSDETRBranch', num_layers=layers))


def _co_heads(cfg, layers):
    from mmengine.config import Config

    from conftest import REPO_ROOT
    aux = Config.fromfile(
        f'{REPO_ROOT}/configs/shapes/co_detr_aux_heads.py').atss_head
    aux = aux.to_dict()
    aux['in_channels'] = cfg['encoder']['layer_cfg']['self_attn_cfg'][
        'embed_dims']
    aux['feat_channels'] = aux['in_channels']
    cfg.setdefault('branches', []).append(
        dict(type='CollaborativeBranch', name='co_atss', aux_head=aux))


def _hybrid(cfg, layers):
    cfg.setdefault('branches', []).append(
        dict(type='HybridMatchingBranch', num_queries=40, k_one_to_many=3))


DETECTORS = {
    'dino':
    lambda: dino_cfg(dims=256),
    'deformable':
    lambda: deformable_detr_cfg(
        refine=True,
        two_stage=True,
        mixed_selection=True,
        look_forward_twice=True),
    'ddq':
    lambda: ddq_cfg(dims=256),
}
TRICKS = {'align': _align, 'stable': _stable, 'ms-detr': _ms_detr}
COMBINATIONS = {
    'co-dino+stable': ('dino', (_co_heads, _stable)),
    'ddq+align': ('ddq', (_align, )),
    'h-deformable+ms-detr': ('deformable', (_hybrid, _ms_detr)),
}


def _cases():
    cases = {
        f'{d}+{t}': (d, (trick, ))
        for d in DETECTORS
        for t, trick in TRICKS.items()
    }
    cases.update(COMBINATIONS)
    return cases


@pytest.mark.parametrize('case', sorted(_cases()))
def test_trains_and_predicts_as_its_base(case):
    detector, tricks = _cases()[case]
    base_cfg = DETECTORS[detector]()
    cfg = copy.deepcopy(base_cfg)
    layers = cfg['decoder']['num_layers']
    for trick in tricks:
        trick(cfg, layers)
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    inputs, samples = make_batch()
    losses = [
        v for value in losses_with_seed(model, inputs, samples).values()
        for v in (value if isinstance(value, list) else [value])
    ]
    assert all(torch.isfinite(v).all() for v in losses), case
    sum(v.sum() for v in losses).backward()
    assert model.bbox_head.cls_branches[0].weight.grad.abs().sum() > 0
    # the tricks change training only: the base model, same weights
    base = build(base_cfg)
    missing, _ = base.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    for ours, theirs in zip(
            predict(model, inputs, samples), predict(base, inputs, samples)):
        assert torch.equal(ours.pred_instances.bboxes,
                           theirs.pred_instances.bboxes), case
        assert torch.equal(ours.pred_instances.scores,
                           theirs.pred_instances.scores), case
