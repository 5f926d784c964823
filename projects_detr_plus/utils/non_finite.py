"""Non-finite losses and gradients: caught before the optimizer steps.

A NaN or Inf loss term (fp16 overflow under AMP, a degenerate box, a bad
learning rate) makes every parameter NaN in the next optimizer step, and
mmengine trains on silently; mmdet's ``CheckInvalidLossHook`` looks at the
loss only after that step, every 50 iterations.  :class:`NonFiniteGuardHook`
wraps the optimizer wrapper's ``backward`` and ``step``: a non-finite loss,
or (without a loss scaler) a non-finite gradient, makes it skip that step,
so the weights and the optimizer state stay those of the last good step.
After the iteration it names the non-finite loss terms (or the parameters
whose gradients are), the iteration and the last checkpoint, and either
logs that and trains on (``action='skip'``, at most ``max_skips`` skipped
steps in the run) or stops with that message (``action='raise'``).

Under ``AmpOptimWrapper`` gradients are left to its loss scaler (an
overflowing fp16 gradient is normal there: the scaler skips the step and
lowers the scale); the loss is still checked.  In a distributed run the
decision is taken by all ranks together (one all-reduce of a flag per
step), so no rank steps while another skips.
"""
import os.path as osp
from functools import wraps

import torch
from mmdet.registry import HOOKS
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.optim import OptimWrapperDict

ACTIONS = ('skip', 'raise')


class NonFiniteTrainingError(FloatingPointError):
    """Training met a non-finite loss or gradient and stops."""


@HOOKS.register_module()
class NonFiniteGuardHook(Hook):
    """Skips (or stops at) optimizer steps with non-finite losses or
    gradients, and says which terms, which iteration, which checkpoint.

    Args:
        action (str): ``'skip'`` the step and train on, or ``'raise'``
            :class:`NonFiniteTrainingError`.
        max_skips (int): with ``'skip'``, the run stops with the error when
            more steps than this have been skipped.
        check_gradients (bool): also check gradients (not under a loss
            scaler, which handles them itself).
    """
    priority = 'VERY_HIGH'

    def __init__(self, action='skip', max_skips=10, check_gradients=True):
        if action not in ACTIONS:
            raise ValueError(f'NonFiniteGuardHook: action must be one of '
                             f'{ACTIONS}, got {action!r}')
        if max_skips < 0:
            raise ValueError(f'NonFiniteGuardHook: max_skips must be >= 0, '
                             f'got {max_skips}')
        self.action, self.max_skips = action, max_skips
        self.check_gradients = check_gradients
        self.skipped = 0
        # since the last step (several iterations with accumulation)
        self._loss_finite = True
        self._bad_params, self._step_skipped = [], False
        self._skipped_loss_finite = True

    def before_train(self, runner):
        wrappers = runner.optim_wrapper
        if isinstance(wrappers, OptimWrapperDict):
            wrappers = wrappers.values()
        else:
            wrappers = [wrappers]
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        names = {p: name for name, p in model.named_parameters()}
        for wrapper in wrappers:
            self._guard(wrapper, names)

    def _guard(self, wrapper, names):
        """Wrap ``wrapper.backward`` (records the loss's finiteness) and
        ``wrapper.step`` (skipped when something is not finite)."""
        backward, step = wrapper.backward, wrapper.step
        scaled = hasattr(wrapper, 'loss_scaler')

        @wraps(backward)
        def guarded_backward(loss, **kwargs):
            self._loss_finite &= bool(torch.isfinite(loss.detach()).all())
            return backward(loss, **kwargs)

        @wraps(step)
        def guarded_step(**kwargs):
            loss_finite, self._loss_finite = self._loss_finite, True
            self._bad_params = []
            if self.check_gradients and not scaled and loss_finite:
                self._bad_params = _non_finite_gradients(wrapper, names)
            bad = not loss_finite or bool(self._bad_params)
            if _any_rank(bad):
                self._step_skipped, self._skipped_loss_finite = \
                    True, loss_finite
                return None
            return step(**kwargs)

        wrapper.backward, wrapper.step = guarded_backward, guarded_step

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self._step_skipped = False

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        if not self._step_skipped:
            return
        self.skipped += 1
        runner.message_hub.update_info('non_finite_skipped_steps',
                                       self.skipped)
        message = self._describe(runner, outputs or {})
        if self.action == 'raise' or self.skipped > self.max_skips:
            if self.action == 'skip':
                message += (f'; {self.skipped} steps skipped, more than '
                            f'max_skips={self.max_skips}')
            raise NonFiniteTrainingError(message)
        runner.logger.warning(f'{message}; step skipped ({self.skipped} of '
                              f'at most {self.max_skips})')

    def _describe(self, runner, log_vars):
        """What was not finite, where, and where to resume from."""
        terms = [
            name for name, value in log_vars.items()
            if name != 'loss' and not _finite(value)
        ]
        if terms:
            what = 'non-finite loss terms ' + ', '.join(
                f'{name}={log_vars[name]}' for name in terms)
        elif not self._skipped_loss_finite:
            what = 'non-finite loss'
        elif self._bad_params:
            shown = ', '.join(self._bad_params[:5])
            if len(self._bad_params) > 5:
                shown += f', {len(self._bad_params) - 5} more'
            what = (f'non-finite gradients of {len(self._bad_params)} '
                    f'parameters ({shown})')
        else:
            what = 'non-finite loss or gradients on another rank'
        return (f'{what} at iteration {runner.iter + 1}; last checkpoint: '
                f'{_last_checkpoint(runner.work_dir)}')


def _finite(value):
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return value == value and abs(value) != float('inf')


def _non_finite_gradients(wrapper, names):
    """Names of the parameters of ``wrapper``'s optimizer whose gradient has
    a NaN or Inf (one check over all of them; names only when one does)."""
    params = [
        p for group in wrapper.optimizer.param_groups for p in group['params']
        if p.grad is not None
    ]
    if not params:
        return []
    norms = torch._foreach_norm([p.grad for p in params])
    if bool(torch.isfinite(torch.stack(norms)).all()):
        return []
    return [
        names.get(p, f'param[{i}]') for i, p in enumerate(params)
        if not torch.isfinite(p.grad).all()
    ]


def _any_rank(flag):
    """``flag`` of this rank, or of any rank in a distributed run."""
    if get_world_size() == 1:
        return flag
    tensor = torch.tensor(float(flag))
    all_reduce(tensor, op='max')
    return bool(tensor.item())


def _last_checkpoint(work_dir):
    """The path mmengine's ``last_checkpoint`` file names, or 'none'."""
    record = osp.join(work_dir, 'last_checkpoint')
    if not osp.exists(record):
        return 'none yet'
    with open(record) as f:
        return f.read().strip()
