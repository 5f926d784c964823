"""`make install` in a fresh virtual environment leaves `pip check` clean
and a working mim, editable and after a regular install (slow: installs
torch, mmcv, mmdet and builds the op twice)."""
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

IGNORED = shutil.ignore_patterns('.git', 'build', 'work_dirs', 'data', '*.so',
                                 '__pycache__', '*.egg-info', '.mim',
                                 '.install-stamp', '.pytest_cache')


def _run(cmd, cwd, timeout=3600):
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f'{cmd} exited {proc.returncode}\n'
                                  f'{proc.stdout[-3000:]}\n'
                                  f'{proc.stderr[-3000:]}')
    return proc.stdout


@pytest.mark.slow
def test_make_install_in_fresh_venv_leaves_pip_check_clean(tmp_path):
    repo = tmp_path / 'repo'
    shutil.copytree(REPO_ROOT, repo, ignore=IGNORED)
    shared = osp.join(osp.dirname(REPO_ROOT), 'shared')
    if osp.isdir(shared):  # the wheelhouse, as beside the real checkout
        os.symlink(shared, tmp_path / 'shared')
    _run([sys.executable, '-m', 'venv', str(tmp_path / 'venv')], tmp_path)
    python = str(tmp_path / 'venv' / 'bin' / 'python')
    _run(['make', 'install', f'PYTHON={python}'], repo)
    _run([python, '-m', 'pip', 'check'], repo)
    active = _run([
        python, '-c', 'from projects_detr_plus import ops; '
        "print(ops.active_implementation('cpu'))"
    ], tmp_path)
    assert active.strip() == 'compiled'
    small = [
        '--cfg-options', 'train_cfg.max_iters=1',
        'train_dataloader.dataset.num_images=4',
        'val_dataloader.dataset.num_images=2',
        'test_dataloader.dataset.num_images=2'
    ]
    # the editable install: mmdet's tools through mim, our configs by path
    _run([
        python, '-m', 'mim', 'train', 'mmdet',
        str(repo / 'configs/shapes/dino-tiny_shapes.py'), '--work-dir',
        str(tmp_path / 'editable'), *small
    ], tmp_path)
    # a regular install ships .mim/: mim finds our configs and model index
    _run([
        python, '-m', 'pip', 'install', '--no-build-isolation', '--no-deps',
        '.'
    ], repo)
    _run([python, '-m', 'pip', 'check'], repo)
    listed = _run([
        python, '-m', 'mim', 'search', 'projects_detr_plus', '--valid-config'
    ], tmp_path)
    assert 'h-deformable-detr-tiny_shapes' in listed
    _run([
        python, '-m', 'mim', 'train', 'projects_detr_plus',
        'dino-tiny_shapes.py', '--work-dir',
        str(tmp_path / 'regular'), *small
    ], tmp_path)
