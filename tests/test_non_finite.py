"""NonFiniteGuardHook in a real training run (the tiny DINO on the shapes
data, mmengine's Runner): a NaN injected into a loss term or a gradient
skips that optimizer step (weights unchanged, training goes on) or stops
training, with a message that names the term or the parameter, the
iteration and the last checkpoint."""
import logging
import math
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from conftest import REPO_ROOT
from projects_detr_plus.utils import NonFiniteGuardHook, NonFiniteTrainingError

CONFIG = osp.join(REPO_ROOT, 'configs/shapes/dino-tiny_shapes.py')
PARAMETER = 'bbox_head.cls_branches.0.bias'


class InjectNaN(Hook):
    """At the given (1-based) iterations, makes the loss term ``loss_cls``
    NaN, or the gradient of :data:`PARAMETER` NaN; keeps the parameters
    after every iteration (buffers such as batch-norm statistics move in the
    forward pass, before any loss)."""
    priority = 'VERY_LOW'

    def __init__(self, iterations, into='loss'):
        self.iterations, self.into = set(iterations), into
        self.weights = {}

    def before_train(self, runner):
        model = runner.model
        loss = model.loss

        def poisoned_loss(*args, **kwargs):
            losses = loss(*args, **kwargs)
            if self._now(runner) and self.into == 'loss':
                losses['loss_cls'] = losses['loss_cls'] * math.nan
            return losses

        model.loss = poisoned_loss
        dict(model.named_parameters())[PARAMETER].register_hook(
            lambda grad: grad * math.nan
            if self._now(runner) and self.into == 'gradient' else grad)
        self.weights[0] = _parameters(model)

    def _now(self, runner):
        return runner.iter + 1 in self.iterations

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        self.weights[runner.iter + 1] = _parameters(runner.model)


def _train(tmp_path, monkeypatch, injector, iters=4, **guard):
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict({
        'work_dir': str(tmp_path / 'work'),
        'train_dataloader.batch_size': 2,
        'train_dataloader.dataset.num_images': 12,
        'train_cfg.max_iters': iters,
        'train_cfg.val_interval': 100,
        'default_hooks.checkpoint.interval': 2,
        'default_hooks.logger.interval': 1,
    })
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.custom_hooks = [
        h for h in cfg.custom_hooks if h['type'] != 'NonFiniteGuardHook'
    ]
    cfg.custom_hooks.append(dict(type='NonFiniteGuardHook', **guard))
    runner = Runner.from_cfg(cfg)
    runner.register_hook(injector)
    guard_hook = next(
        h for h in runner.hooks if isinstance(h, NonFiniteGuardHook))
    return runner, guard_hook


def _parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(state, other):
    return all(torch.equal(state[k], other[k]) for k in state)


def _all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values())


def test_nan_loss_skips_its_step_and_names_the_term(tmp_path, monkeypatch,
                                                    caplog):
    injector = InjectNaN([3])
    runner, guard = _train(tmp_path, monkeypatch, injector)
    with caplog.at_level(logging.WARNING):
        runner.train()
    weights = injector.weights
    assert guard.skipped == 1
    assert not _same(weights[1], weights[2])
    assert _same(weights[2], weights[3])  # the poisoned step was skipped
    assert not _same(weights[3], weights[4])  # and training went on
    assert _all_finite(weights[4])
    assert runner.message_hub.get_info('non_finite_skipped_steps') == 1
    text = open(runner.logger.log_file).read()
    assert 'non-finite loss terms loss_cls=nan at iteration 3' in text
    assert 'iter_2.pth' in text and '1 of at most 10' in text


def test_nan_gradient_is_named_by_parameter(tmp_path, monkeypatch):
    injector = InjectNaN([2], into='gradient')
    runner, guard = _train(tmp_path, monkeypatch, injector, iters=3)
    runner.train()
    assert guard.skipped == 1
    assert _same(injector.weights[1], injector.weights[2])
    assert _all_finite(injector.weights[3])
    text = open(runner.logger.log_file).read()
    assert (f'non-finite gradients of 1 parameters ({PARAMETER}) at '
            f'iteration 2; last checkpoint: none yet') in text


def test_raise_stops_with_the_terms_iteration_and_checkpoint(
        tmp_path, monkeypatch):
    injector = InjectNaN([3])
    runner, _ = _train(tmp_path, monkeypatch, injector, action='raise')
    with pytest.raises(NonFiniteTrainingError) as error:
        runner.train()
    message = str(error.value)
    assert 'loss_cls=nan' in message and 'iteration 3' in message
    assert message.endswith(osp.join(str(tmp_path / 'work'), 'iter_2.pth'))
    assert _same(injector.weights[2], _parameters(runner.model))


def test_more_skips_than_the_limit_stop(tmp_path, monkeypatch):
    injector = InjectNaN([2, 3])
    runner, guard = _train(tmp_path, monkeypatch, injector, max_skips=1)
    with pytest.raises(
            NonFiniteTrainingError,
            match='2 steps skipped, '
            'more than max_skips=1'):
        runner.train()
    assert guard.skipped == 2
    assert _same(injector.weights[1], _parameters(runner.model))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match='action must be one of'):
        NonFiniteGuardHook(action='ignore')
    with pytest.raises(ValueError, match='max_skips must be >= 0'):
        NonFiniteGuardHook(max_skips=-1)
