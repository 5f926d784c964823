"""TrainTimeBudgetHook: a run's length set from its own step time."""
import time

import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner

from projects_detr_plus.utils import TrainTimeBudgetHook

STEP = 0.02  # seconds each training step sleeps


class SleepyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, inputs, data_samples=None, mode='tensor'):
        if mode == 'loss':
            time.sleep(STEP)
            return dict(loss=(self.weight * inputs).sum())
        return [dict(value=float(self.weight))] * len(inputs)


class Iterations(BaseMetric):
    """The training iteration of every validation."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def process(self, data_batch, data_samples):
        self.results.append(1)

    def compute_metrics(self, results):
        self.seen.append(self.runner_iter())
        return dict(count=len(results))


def runner_of(tmp_path, hook, seen, max_iters=1000, resume=False):
    loader = dict(
        dataset=[dict(inputs=torch.ones(1))] * 8,
        batch_size=1,
        sampler=dict(type='InfiniteSampler', shuffle=False),
        collate_fn=dict(type='default_collate'))
    val_loader = dict(
        loader, sampler=dict(type='DefaultSampler', shuffle=False))
    metric = Iterations(seen)
    runner = Runner(
        model=SleepyModel(),
        work_dir=str(tmp_path),
        train_dataloader=loader,
        val_dataloader=val_loader,
        val_evaluator=[metric],
        val_cfg=dict(),
        train_cfg=dict(
            by_epoch=False, max_iters=max_iters, val_interval=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        param_scheduler=[
            dict(
                type='MultiStepLR',
                by_epoch=False,
                milestones=[int(max_iters * 0.9)])
        ],
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook', by_epoch=False, interval=10**6),
            logger=dict(type='LoggerHook', interval=10**6)),
        custom_hooks=[hook],
        resume=resume,
        log_level='WARNING')
    metric.runner_iter = lambda: runner.iter
    return runner


def test_length_evaluations_and_lr_drop_follow_the_budget(tmp_path):
    seen = []
    hook = TrainTimeBudgetHook(
        seconds=40 * STEP, calibrate=3, evaluations=2, recheck=None)
    runner = runner_of(tmp_path, hook, seen)
    runner.train()
    total, interval = hook.decided
    assert total == 2 * interval == runner.iter
    assert 10 <= total <= 40  # 40 steps of sleep, less the overheads
    assert seen == [interval, total]  # none before the length was set
    (scheduler, ) = runner.param_schedulers
    assert list(scheduler.milestones) == [int(total * 0.9)]
    assert hook.train_seconds() >= total * STEP


def test_resume_keeps_the_decided_length(tmp_path):
    first = TrainTimeBudgetHook(seconds=20 * STEP, calibrate=3)
    runner_of(tmp_path, first, []).train()
    # the same run resumed from its last checkpoint: already at its end
    again = TrainTimeBudgetHook(seconds=20 * STEP, calibrate=3)
    resumed = runner_of(tmp_path, again, [], resume=True)
    resumed.train()
    assert again.decided == first.decided
    assert resumed.iter == first.decided[0]


class FakeClock:
    """Seconds that pass only when a training step says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedModel(SleepyModel):
    """Each training step advances ``clock`` by ``cost(step)`` seconds."""

    def __init__(self, clock, cost):
        super().__init__()
        self.clock, self.cost, self.steps = clock, cost, 0

    def forward(self, inputs, data_samples=None, mode='tensor'):
        if mode == 'loss':
            self.steps += 1
            self.clock.now += self.cost(self.steps)
            return dict(loss=(self.weight * inputs).sum())
        return super().forward(inputs, data_samples, mode)


class RecordLR(Hook):

    def __init__(self):
        self.lrs = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lrs.append(runner.optim_wrapper.get_lr()['lr'][0])


def run_on_fake_clock(tmp_path, cost, **kwargs):
    """Train with a 100 s budget where step ``i`` (from 1) costs
    ``cost(i)`` fake seconds; the hook and each iteration's LR."""
    clock = FakeClock()
    kwargs.setdefault('recheck', 10)
    hook = TrainTimeBudgetHook(seconds=100, calibrate=10, **kwargs)
    hook._clock = clock
    lrs = RecordLR()
    runner = runner_of(tmp_path, hook, [])
    runner.model = TimedModel(clock, cost)
    runner.register_hook(lrs)
    runner.train()
    return hook, runner, clock, lrs.lrs


def test_a_step_that_slows_down_is_rechecked(tmp_path):
    # 1 s a step for 30 steps, then 2 s: 100 steps decided at step 10,
    # 30 + (100 - 50) / 2 ... = 65 from the re-check at step 40
    hook, runner, clock, lrs = run_on_fake_clock(
        tmp_path, lambda step: 1.0 if step <= 30 else 2.0)
    assert hook.decided == (65, 65) and runner.iter == 65
    assert clock.now == 100
    drop = int(65 * 0.9)  # moved from 90 while it was still ahead
    assert lrs[drop - 1] == pytest.approx(0.1)
    assert lrs[drop] == pytest.approx(0.01) == lrs[-1]


def test_a_learning_rate_drop_already_taken_stays(tmp_path):
    # the slow-down shows at the re-check of step 90, when the LR has
    # dropped (milestone 90 of 100): the run ends at once, one drop only
    hook, runner, clock, lrs = run_on_fake_clock(
        tmp_path, lambda step: 1.0 if step <= 85 else 3.0)
    assert hook.decided == (91, 91) and runner.iter == 91
    assert lrs[89] == pytest.approx(0.1) and lrs[90] == pytest.approx(0.01)


def test_without_recheck_the_first_decision_stands(tmp_path):
    hook, runner, clock, _ = run_on_fake_clock(
        tmp_path, lambda step: 1.0 if step <= 30 else 2.0, recheck=None)
    assert hook.decided == (100, 100) and runner.iter == 100
    assert clock.now == 30 + 70 * 2  # the budget overrun


@pytest.mark.parametrize('kwargs', [
    dict(seconds=0),
    dict(seconds=5, calibrate=0),
    dict(seconds=5, evaluations=0),
    dict(seconds=5, lr_drop_at=1.5),
    dict(seconds=5, recheck=0)
])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        TrainTimeBudgetHook(**kwargs)


def test_recheck_keeps_the_number_of_evaluations(tmp_path):
    """4 evaluations, decided at 100 steps (every 25); the step doubles
    after 30 steps: the length shrinks, the validation made at 25 stays the
    first, and there are still exactly 4, the last at the end."""
    clock, seen = FakeClock(), []
    hook = TrainTimeBudgetHook(
        seconds=100, calibrate=10, recheck=10, evaluations=4)
    hook._clock = clock
    runner = runner_of(tmp_path, hook, seen)
    runner.model = TimedModel(clock, lambda s: 1.0 if s <= 30 else 2.0)
    runner.train()
    # re-checks: at 40 every 20 (80), at 50 every 17 from the next one (68)
    assert seen == [25, 40, 51, 68]
    assert hook.decided == (68, 17) and runner.iter == 68
