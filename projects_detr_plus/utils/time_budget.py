"""Train for a wall-clock budget instead of a number of iterations."""
import time
from collections import Counter

from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop

CHECKPOINT_KEY = 'train_time_budget'


@HOOKS.register_module()
class TrainTimeBudgetHook(Hook):
    """Set an iteration-based run's length from its own step time.

    After ``calibrate`` iterations the hook measures the seconds per
    iteration (validation excluded) and sets the run to as many iterations
    as fit in ``seconds``, with ``evaluations`` validations spread evenly,
    the last at the end, and every ``MultiStepLR`` milestone moved to
    ``lr_drop_at`` of the run (the shapes configs' single drop at 90 %).
    The decided length is stored in checkpoints, so a resumed run ends
    where the first one would have.

    Args:
        seconds (float, optional): training seconds, validation not
            counted; None only measures (:meth:`train_seconds`).
        calibrate (int): iterations timed before the length is set.
        evaluations (int): validations, the last at the final iteration.
        lr_drop_at (float): fraction of the run where the learning rate of
            each ``MultiStepLR`` drops.
    """
    priority = 'LOW'

    def __init__(self, seconds, calibrate=20, evaluations=1, lr_drop_at=0.9):
        if (seconds is not None and seconds <= 0) or calibrate < 1 or \
                evaluations < 1:
            raise ValueError('TrainTimeBudgetHook needs seconds > 0, '
                             f'calibrate >= 1 and evaluations >= 1, got '
                             f'{seconds}, {calibrate}, {evaluations}')
        if not 0 < lr_drop_at <= 1:
            raise ValueError(f'lr_drop_at must be in (0, 1], got {lr_drop_at}')
        self.seconds, self.calibrate = seconds, calibrate
        self.evaluations, self.lr_drop_at = evaluations, lr_drop_at
        self.decided = None  # (max_iters, val_interval) once set
        self._start = self._val_start = None
        self._in_val, self._first_iter = 0.0, 0

    def train_seconds(self):
        """Seconds of training so far in this process, validation
        excluded."""
        return time.time() - self._start - self._in_val

    def before_train(self, runner):
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            raise TypeError('TrainTimeBudgetHook needs an IterBasedTrainLoop'
                            f', got {type(runner.train_loop).__name__}')
        self._start, self._in_val = time.time(), 0.0
        self._first_iter = runner.iter
        if self.seconds is None:
            return
        if self.decided is None:  # no evaluation before the length is set
            placeholder = max(runner.train_loop.max_iters,
                              self.calibrate + 1)
            self._apply(runner, placeholder, placeholder + 1, lr=False)
        else:  # resumed
            self._apply(runner, *self.decided)

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        done = runner.iter + 1 - self._first_iter  # in this process
        if self.seconds is not None and self.decided is None and \
                done >= self.calibrate:
            per_iter = self.train_seconds() / done
            interval = max(int(self.seconds / per_iter) // self.evaluations,
                           (runner.iter + 1) // self.evaluations + 1)
            self.decided = (interval * self.evaluations, interval)
            self._apply(runner, *self.decided)
            runner.logger.info(
                f'time budget: {per_iter:.3f} s/iter, {self.decided[0]} '
                f'iterations in {self.seconds} s of training')

    def before_val(self, runner):
        self._val_start = time.time()

    def after_val(self, runner):
        if self._val_start is not None:
            self._in_val += time.time() - self._val_start
            self._val_start = None

    def before_save_checkpoint(self, runner, checkpoint):
        if self.decided is not None:
            checkpoint[CHECKPOINT_KEY] = list(self.decided)

    def after_load_checkpoint(self, runner, checkpoint):
        if runner._resume and CHECKPOINT_KEY in checkpoint:
            self.decided = tuple(checkpoint[CHECKPOINT_KEY])

    def _apply(self, runner, max_iters, val_interval, lr=True):
        """The loop's length and validation interval; the LR drop."""
        loop = runner.train_loop
        loop._max_iters = max_iters
        loop.val_interval = val_interval
        loop.dynamic_intervals = [val_interval]
        if not lr:
            return
        drop = int(max_iters * self.lr_drop_at)
        schedulers = runner.param_schedulers or []
        if isinstance(schedulers, dict):  # one list per optimizer
            schedulers = [s for group in schedulers.values() for s in group]
        for scheduler in schedulers:
            if hasattr(scheduler, 'milestones'):
                scheduler.milestones = Counter([drop])
                scheduler.end = max_iters
