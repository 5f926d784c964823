"""TrainTimeBudgetHook: a run's length set from its own step time."""
import time

import pytest
import torch
from mmengine.evaluator import BaseMetric
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
    loader = dict(dataset=[dict(inputs=torch.ones(1))] * 8, batch_size=1,
                  sampler=dict(type='InfiniteSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    val_loader = dict(loader, sampler=dict(type='DefaultSampler',
                                           shuffle=False))
    metric = Iterations(seen)
    runner = Runner(
        model=SleepyModel(), work_dir=str(tmp_path),
        train_dataloader=loader, val_dataloader=val_loader,
        val_evaluator=[metric], val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=max_iters,
                       val_interval=max_iters),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        param_scheduler=[dict(type='MultiStepLR', by_epoch=False,
                              milestones=[int(max_iters * 0.9)])],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                           by_epoch=False, interval=10**6),
                           logger=dict(type='LoggerHook', interval=10**6)),
        custom_hooks=[hook], resume=resume, log_level='WARNING')
    metric.runner_iter = lambda: runner.iter
    return runner


def test_length_evaluations_and_lr_drop_follow_the_budget(tmp_path):
    seen = []
    hook = TrainTimeBudgetHook(seconds=40 * STEP, calibrate=3,
                               evaluations=2)
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


@pytest.mark.parametrize('kwargs', [dict(seconds=0), dict(seconds=5,
                                                          calibrate=0),
                                    dict(seconds=5, evaluations=0),
                                    dict(seconds=5, lr_drop_at=1.5)])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError):
        TrainTimeBudgetHook(**kwargs)
