"""DDP on CPU (gloo, 2 processes through torchrun, as tools/dist_train.sh):
a rank that raises stops both ranks within a bounded time, and the error is
shown; the other rank, waiting in the step's collectives, does not hang."""
import os
import os.path as osp
import socket
import subprocess
import sys
import time

from conftest import REPO_ROOT

# the whole run, start-up included (about 25 s here); a rank left waiting
# in gloo's collectives would hang for its 30-minute timeout
BOUND_SECONDS = 180


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_failing_rank_stops_both(tmp_path):
    cmd = [
        sys.executable, '-m', 'torch.distributed.run', '--nnodes=1',
        '--nproc_per_node=2', f'--master_port={_free_port()}',
        osp.join(REPO_ROOT, 'tests/kill_at.py'), 'raise:1:3',
        osp.join(REPO_ROOT, 'tools/train.py'),
        osp.join(REPO_ROOT, 'configs/shapes/dino-tiny_shapes.py'),
        '--launcher', 'pytorch', '--work-dir',
        str(tmp_path / 'work'), '--cfg-options',
        'train_dataloader.batch_size=1',
        'train_dataloader.dataset.num_images=12', 'val_cfg=None',
        'val_dataloader=None', 'val_evaluator=None', 'train_cfg.max_iters=50',
        'default_hooks.logger.interval=1'
    ]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS='1')
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert 'injected failure on rank 1 before iteration 3' in output
    # rank 0 trained up to the failure and no further
    assert 'Iter(train) [ 2/50]' in output, output[-3000:]
    assert 'Iter(train) [ 4/50]' not in output
    assert time.monotonic() - start < BOUND_SECONDS
    # torchrun returns once both workers are gone, naming the failure
    assert 'ChildFailedError' in output, output[-3000:]
