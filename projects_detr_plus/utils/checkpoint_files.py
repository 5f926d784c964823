"""Checkpoint files that survive a process killed while writing them.

mmengine writes a checkpoint with ``open(path, 'wb').write(...)``: a run
killed during that write (SIGKILL, out of memory, a node taken back by the
scheduler) leaves a truncated ``iter_N.pth``; ``--resume`` then fails with
torch's "failed finding central directory", which does not say which file.
Importing
:mod:`projects_detr_plus` changes three things for local paths:

* **atomic writes**: :func:`atomic_put` (mmengine's ``LocalBackend.put``)
  writes ``PATH.part``, flushes it to disk and renames it to ``PATH``, so a
  file under a checkpoint's name is always complete;
* **a complete checkpoint to resume from**: ``--resume`` without a path
  (mmengine's ``find_latest_checkpoint``) takes the checkpoint that
  ``last_checkpoint`` names if it is complete, else the newest complete
  ``iter_N.pth`` / ``epoch_N.pth`` of the work dir, with a warning naming the
  file it skipped;
* **a named error**: loading an incomplete checkpoint raises
  :class:`IncompleteCheckpointError` with its path
  (:func:`..checkpoint.load_from_local_trusted`).

mmengine's ``CheckpointHook`` deletes the oldest checkpoint *before* it
writes the next one, so ``max_keep_ckpts=1`` can leave no complete
checkpoint after a kill during a write; keep 2 or more (the shapes configs
keep 2, mmdet's COCO runtime all).
"""
import os
import os.path as osp
import re
import zipfile

import mmengine
import mmengine.runner.runner as mmengine_runner
from mmengine.fileio.backends import LocalBackend
from mmengine.logging import print_log

PARTIAL_SUFFIX = '.part'
_NUMBERED = re.compile(r'^(?:iter|epoch)_(\d+)\.pth$')


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint file that was cut off while being written."""


def atomic_put(self, obj, filepath):
    """Write bytes to ``filepath`` through ``filepath.part`` and a rename
    (replaces :meth:`LocalBackend.put`)."""
    filepath = str(filepath)
    mmengine.mkdir_or_exist(osp.dirname(filepath))
    partial = filepath + PARTIAL_SUFFIX
    with open(partial, 'wb') as f:
        f.write(obj)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, filepath)


def is_incomplete_checkpoint(path):
    """True for a missing or empty file and for a zip archive (torch.save's
    format) without its central directory, which is written last; other
    files (torch's legacy format) are not judged."""
    if not osp.isfile(path) or osp.getsize(path) == 0:
        return True
    with open(path, 'rb') as f:
        is_zip = f.read(4) == b'PK\x03\x04'
    return is_zip and not zipfile.is_zipfile(path)


def numbered_checkpoints(work_dir):
    """``iter_N.pth`` / ``epoch_N.pth`` of ``work_dir``, newest first."""
    names = [name for name in os.listdir(work_dir) if _NUMBERED.match(name)]
    names.sort(
        key=lambda name: int(_NUMBERED.match(name).group(1)), reverse=True)
    return [osp.join(work_dir, name) for name in names]


def find_latest_complete_checkpoint(work_dir):
    """The checkpoint ``--resume`` continues from: the one ``last_checkpoint``
    names, or the newest complete one if that one is not complete; None
    when there is none."""
    record = osp.join(work_dir, 'last_checkpoint')
    named = None
    if osp.exists(record):
        with open(record) as f:
            named = f.read().strip() or None
    if named and not is_incomplete_checkpoint(named):
        return named
    if not osp.isdir(work_dir):
        return None
    for path in numbered_checkpoints(work_dir):
        if not is_incomplete_checkpoint(path):
            if named:
                print_log(
                    f'{named} is incomplete or missing (cut off while '
                    f'being written?); resuming from {path}',
                    logger='current',
                    level=30)
            return path
    if named:
        print_log(
            f'{named} is incomplete or missing and {work_dir} holds '
            f'no complete checkpoint: training starts afresh',
            logger='current',
            level=30)
    return None


def install_crash_safe_checkpoints():
    """Atomic local writes and a complete checkpoint for ``--resume``.
    Idempotent."""
    LocalBackend.put = atomic_put
    mmengine_runner.find_latest_checkpoint = find_latest_complete_checkpoint
