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
    Every ``recheck`` iterations after that it times the last ``recheck``
    steps and sets the length again from the seconds still left, so a step
    that slows down (or speeds up) later does not overrun the budget; a
    learning-rate drop already taken stays where it was, and validations
    already made stay the first of ``evaluations`` (which bounds how far
    the length can move after one).
    The decided length is stored in checkpoints, so a resumed run ends
    where the first one would have (it is not re-checked after a resume).

    Args:
        seconds (float, optional): training seconds, validation not
            counted; None only measures (:meth:`train_seconds`).
        calibrate (int): iterations timed before the length is set.
        evaluations (int): validations, the last at the final iteration.
        lr_drop_at (float): fraction of the run where the learning rate of
            each ``MultiStepLR`` drops.
        recheck (int, optional): iterations between re-checks of the
            length; None keeps the first decision.
    """
    priority = 'LOW'

    def __init__(self,
                 seconds,
                 calibrate=20,
                 evaluations=1,
                 lr_drop_at=0.9,
                 recheck=100):
        if (seconds is not None and seconds <= 0) or calibrate < 1 or \
                evaluations < 1 or (recheck is not None and recheck < 1):
            raise ValueError('TrainTimeBudgetHook needs seconds > 0, '
                             'calibrate >= 1, evaluations >= 1 and recheck '
                             f'>= 1 or None, got {seconds}, {calibrate}, '
                             f'{evaluations}, {recheck}')
        if not 0 < lr_drop_at <= 1:
            raise ValueError(f'lr_drop_at must be in (0, 1], got {lr_drop_at}')
        self.seconds, self.calibrate = seconds, calibrate
        self.evaluations, self.lr_drop_at = evaluations, lr_drop_at
        self.recheck = recheck
        self.decided = None  # (max_iters, val_interval) once set
        self._clock = time.perf_counter
        self._start = self._val_start = None
        self._in_val, self._first_iter = 0.0, 0
        self._resumed = False
        self._last_check = None  # (iteration, train seconds) of the last one
        self._drop = None  # the LR milestone set
        self._evaluated = 0  # validations in this process
        self._logged = 0  # the length last logged

    def train_seconds(self):
        """Seconds of training so far in this process, validation
        excluded."""
        return self._clock() - self._start - self._in_val

    def before_train(self, runner):
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            raise TypeError('TrainTimeBudgetHook needs an IterBasedTrainLoop'
                            f', got {type(runner.train_loop).__name__}')
        self._start, self._in_val = self._clock(), 0.0
        self._first_iter = runner.iter
        if self.seconds is None:
            return
        if self.decided is None:  # no evaluation before the length is set
            placeholder = max(runner.train_loop.max_iters, self.calibrate + 1)
            self._set_loop(runner, placeholder, placeholder + 1)
            self._move_lr_drop(runner, placeholder + 1, placeholder + 1)
        else:  # resumed: the schedulers' milestones came with their state
            self._resumed = True
            self._drop = -1  # taken or set: left as loaded
            self._apply(runner, *self.decided)

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        if self.seconds is None or self._resumed:
            return
        done = runner.iter + 1  # iterations finished, all in this process
        if self.decided is None and done - self._first_iter >= self.calibrate:
            self._decide(runner, self._first_iter, 0.0)
        elif self._last_check is not None and self.recheck is not None and \
                done - self._last_check[0] >= self.recheck and \
                done < self.decided[0]:
            self._decide(runner, *self._last_check)

    def _decide(self, runner, since_iter, since_seconds):
        """Set the length from the steps timed since ``since_iter``."""
        done, spent = runner.iter + 1, self.train_seconds()
        per_iter = (spent - since_seconds) / (done - since_iter)
        left = max(int((self.seconds - spent) / per_iter), 1)
        interval = self._interval(done, -(-(done + left) // self.evaluations))
        decided = (interval * self.evaluations, interval)
        self._last_check = (done, spent)
        if decided == self.decided:
            return
        first, self.decided = self.decided is None, decided
        self._apply(runner, *decided)
        if first or abs(decided[0] - self._logged) > 0.02 * self._logged:
            self._logged = decided[0]  # log the first and big changes
            runner.logger.info(
                f'time budget: {per_iter:.3f} s/iter, {decided[0]} '
                f'iterations in {self.seconds} s of training')

    def _interval(self, done, wanted):
        """The validation interval nearest ``wanted`` that keeps the
        validations so far (at iterations below ``done``; the loop may
        validate at ``done`` next) the first ones of ``evaluations``."""
        seen = self._evaluated
        interval = max(wanted, (done - 1) // (seen + 1) + 1)
        return min(interval, (done - 1) // seen) if seen else interval

    def before_val(self, runner):
        self._val_start = self._clock()

    def after_val(self, runner):
        if self._val_start is not None:
            self._in_val += self._clock() - self._val_start
            self._val_start = None
            self._evaluated += 1

    def before_save_checkpoint(self, runner, checkpoint):
        if self.decided is not None:
            checkpoint[CHECKPOINT_KEY] = list(self.decided)

    def after_load_checkpoint(self, runner, checkpoint):
        if runner._resume and CHECKPOINT_KEY in checkpoint:
            self.decided = tuple(checkpoint[CHECKPOINT_KEY])

    def _apply(self, runner, max_iters, val_interval):
        """The loop's length and validation interval; the LR drop at
        ``lr_drop_at`` of it, unless it was already taken."""
        self._set_loop(runner, max_iters, val_interval)
        # ParamSchedulerHook has stepped the schedulers to runner.iter + 1:
        # a milestone at or below it is taken, the next free one is + 2
        if self._drop is None or self._drop > runner.iter + 1:
            self._drop = max(int(max_iters * self.lr_drop_at), runner.iter + 2)
            self._move_lr_drop(runner, self._drop, max_iters)

    @staticmethod
    def _set_loop(runner, max_iters, val_interval):
        loop = runner.train_loop
        loop._max_iters = max_iters
        loop.val_interval = val_interval
        loop.dynamic_intervals = [val_interval]

    @staticmethod
    def _move_lr_drop(runner, milestone, end):
        """Every ``MultiStepLR``'s single drop to ``milestone``."""
        schedulers = runner.param_schedulers or []
        if isinstance(schedulers, dict):  # one list per optimizer
            schedulers = [s for group in schedulers.values() for s in group]
        for scheduler in schedulers:
            if hasattr(scheduler, 'milestones'):
                scheduler.milestones = Counter([milestone])
                scheduler.end = end
