"""Exact resume: the random number generators travel with the checkpoint.

mmengine's resume restores weights, optimizer, schedulers and the iteration,
then re-seeds the generators, so a resumed run draws other denoising noise,
other dropout masks and other flips than the run it continues.
:class:`RandomStateHook` stores the Python, NumPy and torch (CPU and CUDA)
generator states in every checkpoint and puts them back on resume, right
before the first resumed batch is loaded: after mmengine's iteration-based
loop has replayed the data loader over the batches already trained, so that
replay (which runs the augmentation pipeline) does not shift the streams.

Validation leaves the training streams untouched (their state is saved
before and restored after it), so a checkpoint taken right before a
validation resumes exactly too.

Exact for single-process runs with ``num_workers=0`` loaders (the shapes
configs).  With worker processes the workers' own generators are seeded by
mmengine, not restored.  Checkpoints are written by rank 0 alone, so in a
distributed run rank 0 restores its streams and the other ranks keep
mmengine's re-seeding.
"""
import random

import numpy as np
import torch
from mmdet.registry import HOOKS
from mmengine.dist import get_rank
from mmengine.hooks import Hook

CHECKPOINT_KEY = 'rng_state'


def get_rng_state():
    """The generator states of this process."""
    state = dict(
        python=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`get_rng_state` returned."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    # a checkpoint loaded with map_location='cuda' holds CUDA tensors
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


class _RestoreAfterReplay:
    """Wraps the loop's data iterator: after ``skip`` batches (mmengine's
    replay on resume) restores ``state``, then passes batches through."""

    def __init__(self, iterator, skip, state):
        self.iterator, self.skip, self.state = iterator, skip, state
        if skip == 0:
            self._restore()

    def _restore(self):
        if self.state is not None:
            set_rng_state(self.state)
            self.state = None

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.skip -= 1
        if self.skip == 0:
            self._restore()
        return batch


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the generator states in checkpoints; restore them on resume.

    Add it to a config with ``custom_hooks = [dict(type='RandomStateHook')]``
    (the shapes configs do).  Checkpoints without the states resume as
    before.
    """
    priority = 'VERY_HIGH'

    def __init__(self):
        self._resumed_state = None
        self._training_state = None

    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint[CHECKPOINT_KEY] = get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint):
        # load_from of weights alone keeps the seed; only rank 0's states
        # are in the checkpoint
        if runner._resume and get_rank() == 0:
            self._resumed_state = checkpoint.get(CHECKPOINT_KEY)

    def before_val(self, runner):
        self._training_state = get_rng_state()

    def after_val(self, runner):
        if self._training_state is not None:
            set_rng_state(self._training_state)
            self._training_state = None

    def before_train(self, runner):
        if self._resumed_state is None:
            return
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):  # iteration-based loop
            loop.dataloader_iterator = _RestoreAfterReplay(
                loop.dataloader_iterator, runner.iter, self._resumed_state)
        else:  # epoch-based: no replay, the next epoch starts afresh
            set_rng_state(self._resumed_state)
        self._resumed_state = None
