"""Loading runner checkpoints with torch >= 2.6.

torch 2.6 made ``torch.load`` default to ``weights_only=True``. mmengine 0.10.x
calls ``torch.load(filename, map_location=...)`` for local files, and its
runner checkpoints hold more than tensors (the message hub's history buffers,
numpy scalars, the config), so ``--resume`` and ``load_from`` fail with an
``UnpicklingError``.

Importing :mod:`projects_detr_plus` replaces mmengine's loader for *local
paths* (the ``''`` scheme of :class:`mmengine.runner.CheckpointLoader`, used by
``load_from``, ``--resume`` and ``load_checkpoint``) with one that passes
``weights_only=False``.  ``torch.load`` elsewhere is untouched, and so are the
http/s3 loaders used for pretrained weights.

Trust: ``weights_only=False`` unpickles arbitrary Python objects, exactly as
torch < 2.6 did.  Only point ``load_from``/``--resume`` at checkpoints you or
someone you trust produced.  Set ``DETR_PLUS_WEIGHTS_ONLY=1`` to keep torch's
safe default (tensor-only checkpoints still load then).
"""
import os
import os.path as osp

import torch
from mmengine.runner.checkpoint import CheckpointLoader

from .checkpoint_files import (IncompleteCheckpointError,
                               is_incomplete_checkpoint)

LOCAL_SCHEME = ''


def load_from_local_trusted(filename, map_location=None):
    """Load a local runner checkpoint the user pointed at (trusted input)."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    weights_only = os.getenv('DETR_PLUS_WEIGHTS_ONLY', '0') == '1'
    try:
        return torch.load(
            filename, map_location=map_location, weights_only=weights_only)
    except Exception as error:
        if not is_incomplete_checkpoint(filename):
            raise
        raise IncompleteCheckpointError(
            f'{filename} is not a complete checkpoint (cut off while being '
            f'written?): {error}. `--resume` without a path continues from '
            f'the newest complete checkpoint of the work dir.') from error


def install_local_checkpoint_loader():
    """Make mmengine load local checkpoints with ``weights_only=False``.

    Idempotent.  mmengine keeps loaders in a plain dict keyed by path prefix;
    the ``''`` prefix is the fallback for local files.
    """
    # Direct assignment (not register_scheme) keeps mmengine's prefix order.
    CheckpointLoader._schemes[LOCAL_SCHEME] = load_from_local_trusted
