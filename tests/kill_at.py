"""Run ``tools/train.py`` and SIGKILL it at a chosen point (test helper).

    python tests/kill_at.py POINT tools/train.py CONFIG [train.py args]

POINT is ``iteration:N`` (before training iteration N, 1-based),
``write:NAME`` (halfway through writing the checkpoint file NAME: its
``NAME.part``) or ``record:NAME`` (right after ``last_checkpoint`` was
opened, hence emptied, to record NAME).  The process kills itself, as the
kernel's SIGKILL would: no handler, no cleanup.  ``raise:R:N`` instead
raises ``RuntimeError`` on distributed rank R before iteration N (the
other ranks go on into that iteration's collectives).
"""
import builtins
import os
import runpy
import signal
import sys

from mmengine.runner.loops import IterBasedTrainLoop


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class _HalfWritten:
    """A file whose first ``write`` writes half its bytes, then dies."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        os.fsync(self.file.fileno())
        _die()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def _kill_at_iteration(number):
    run_iter = IterBasedTrainLoop.run_iter

    def dying_run_iter(self, data_batch):
        if self._iter + 1 == number:
            _die()
        return run_iter(self, data_batch)

    IterBasedTrainLoop.run_iter = dying_run_iter


def _raise_at(rank, number):
    run_iter = IterBasedTrainLoop.run_iter

    def failing_run_iter(self, data_batch):
        from mmengine.dist import get_rank
        if self._iter + 1 == number and get_rank() == rank:
            raise RuntimeError(f'injected failure on rank {rank} before '
                               f'iteration {number}')
        return run_iter(self, data_batch)

    IterBasedTrainLoop.run_iter = failing_run_iter


def _kill_in_open(kind, name):
    real_open = builtins.open

    def dying_open(file, mode='r', *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        path = str(file)
        if kind == 'write' and path.endswith(name + '.part'):
            return _HalfWritten(handle)
        if kind == 'record' and 'w' in mode and path.endswith(
                'last_checkpoint') and _recording(name):
            _die()
        return handle

    builtins.open = dying_open


def _recording(name):
    """True while mmengine's CheckpointHook records ``name`` (the frame that
    opens ``last_checkpoint`` holds it as ``self.last_ckpt``)."""
    frame = sys._getframe(2)
    owner = frame.f_locals.get('self')
    return str(getattr(owner, 'last_ckpt', '')).endswith(name)


def main():
    point, argv = sys.argv[1], sys.argv[2:]
    kind, _, value = point.partition(':')
    if kind == 'iteration':
        _kill_at_iteration(int(value))
    elif kind in ('write', 'record'):
        _kill_in_open(kind, value)
    elif kind == 'raise':
        rank, _, number = value.partition(':')
        _raise_at(int(rank), int(number))
    else:
        raise ValueError(f'unknown kill point {point!r}')
    sys.argv = argv
    runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
