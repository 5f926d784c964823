"""A real ``tools/train.py`` run killed with SIGKILL (between iterations,
halfway through writing a checkpoint, while recording the last checkpoint)
and resumed with ``--resume``: it continues from the last complete
checkpoint and ends with the weights of an uninterrupted run, bit for bit.
A truncated checkpoint gives an error that names the file; ``--resume``
without a path skips it for the previous complete one."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, run_tool
from projects_detr_plus.utils import IncompleteCheckpointError
from projects_detr_plus.utils.checkpoint import load_from_local_trusted
from projects_detr_plus.utils.checkpoint_files import (
    find_latest_complete_checkpoint, is_incomplete_checkpoint)

TRAIN = [
    osp.join(REPO_ROOT, 'tools/train.py'),
    osp.join(REPO_ROOT, 'configs/shapes/dino-tiny_shapes.py')
]
OPTIONS = [
    '--cfg-options', 'train_dataloader.batch_size=2',
    'train_dataloader.dataset.num_images=12', 'val_cfg=None',
    'val_dataloader=None', 'val_evaluator=None', 'train_cfg.max_iters=6',
    'default_hooks.checkpoint.interval=2',
    'default_hooks.checkpoint.max_keep_ckpts=2',
    'randomness.deterministic=True'
]


def _train(cwd, work_dir, *extra):
    return run_tool([*TRAIN, '--work-dir',
                     str(work_dir), *extra, *OPTIONS],
                    cwd=cwd)


def _train_killed(cwd, work_dir, point):
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tests/kill_at.py'), point, *TRAIN, '--work-dir',
        str(work_dir), *OPTIONS
    ],
                          cwd=cwd,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          capture_output=True,
                          text=True,
                          timeout=900)
    assert proc.returncode == -9, proc.stderr[-3000:]


def _weights(path):
    return torch.load(
        path, map_location='cpu', weights_only=False)['state_dict']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp('crash')
    _train(cwd, cwd / 'whole')
    return cwd, _weights(cwd / 'whole/iter_6.pth')


@pytest.mark.parametrize(
    'point, resumes_from',
    [
        ('iteration:5', 'iter_4.pth'),
        ('write:iter_4.pth', 'iter_2.pth'),
        # last_checkpoint emptied: the newest complete checkpoint is found
        ('record:iter_4.pth', 'iter_4.pth'),
    ])
def test_killed_run_resumes_to_the_same_weights(uninterrupted, point,
                                                resumes_from):
    cwd, expected = uninterrupted
    work_dir = cwd / point.replace(':', '_')
    _train_killed(cwd, work_dir, point)
    if point.startswith('write'):
        assert not (work_dir / 'iter_4.pth').exists()
        assert is_incomplete_checkpoint(str(work_dir / 'iter_4.pth.part'))
    proc = _train(cwd, work_dir, '--resume')
    assert (f'Auto resumed from the latest checkpoint '
            f'{work_dir / resumes_from}') in proc.stdout + proc.stderr
    weights = _weights(work_dir / 'iter_6.pth')
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_truncated_checkpoint_is_named_and_skipped(uninterrupted, tmp_path):
    cwd, _ = uninterrupted
    work_dir = tmp_path / 'work'
    shutil.copytree(cwd / 'whole', work_dir)
    last = work_dir / 'iter_6.pth'
    data = last.read_bytes()
    last.write_bytes(data[:len(data) // 3])  # as a non-atomic writer leaves
    (work_dir / 'last_checkpoint').write_text(str(last))

    with pytest.raises(IncompleteCheckpointError, match=str(last)):
        load_from_local_trusted(str(last))
    assert find_latest_complete_checkpoint(str(work_dir)) == str(work_dir /
                                                                 'iter_4.pth')
    proc = subprocess.run([
        sys.executable, *TRAIN, '--work-dir',
        str(work_dir), '--resume',
        str(last), *OPTIONS
    ],
                          cwd=cwd,
                          capture_output=True,
                          text=True,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                          timeout=900)
    assert proc.returncode != 0
    assert f'{last} is not a complete checkpoint' in proc.stderr


def test_no_complete_checkpoint_starts_afresh(tmp_path):
    (tmp_path / 'iter_2.pth').write_bytes(b'PK\x03\x04 cut off')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_2.pth'))
    assert find_latest_complete_checkpoint(str(tmp_path)) is None
    assert find_latest_complete_checkpoint(str(tmp_path / 'absent')) is None
