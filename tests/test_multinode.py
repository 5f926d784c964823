"""tools/dist_train.sh across two "nodes" (two torchrun launches on
127.0.0.1 with NNODES=2 and node ranks 0 and 1, gloo, one process each)."""
import os
import os.path as osp
import socket
import subprocess

import torch

from conftest import REPO_ROOT

DUMP_HOOK = '''
import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankWeights(Hook):
    """After training, every rank saves its own model's parameters
    (buffers such as BN running statistics are each rank's own until DDP
    broadcasts rank 0's at the next forward)."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def after_train(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        torch.save(dict(world_size=get_world_size(),
                        state_dict={k: p.detach() for k, p in
                                    model.named_parameters()}),
                   f'{self.out_dir}/rank{get_rank()}.pth')
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_nodes_train_to_the_same_weights(tmp_path):
    (tmp_path / 'dump_rank_weights.py').write_text(DUMP_HOOK)
    config = tmp_path / 'two_nodes.py'
    config.write_text(
        f"_base_ = '{REPO_ROOT}/configs/shapes/dino-tiny_shapes.py'\n"
        "custom_imports = dict(imports=['projects_detr_plus', "
        "'dump_rank_weights'], allow_failed_imports=False)\n"
        "custom_hooks = [dict(type='DumpRankWeights', "
        f"out_dir='{tmp_path}')]\n"
        "train_cfg = dict(max_iters=3, val_interval=100)\n"
        "default_hooks = dict(logger=dict(interval=1))\n"
        "train_dataloader = dict(batch_size=2, dataset=dict(num_images=8))\n"
        "val_dataloader = dict(dataset=dict(num_images=4))\n"
        "test_dataloader = dict(dataset=dict(num_images=4))\n")
    env = dict(
        os.environ,
        PYTHONPATH=f'{REPO_ROOT}:{tmp_path}',
        NNODES='2',
        MASTER_ADDR='127.0.0.1',
        PORT=str(_free_port()),
        OMP_NUM_THREADS='1')
    nodes = []
    for rank in (0, 1):
        log = open(tmp_path / f'node{rank}.log', 'w')
        nodes.append((subprocess.Popen([
            'bash',
            osp.join(REPO_ROOT, 'tools/dist_train.sh'),
            str(config), '1', '--work-dir',
            str(tmp_path / f'work{rank}')
        ],
                                       cwd=tmp_path,
                                       env=dict(env, NODE_RANK=str(rank)),
                                       stdout=log,
                                       stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in nodes:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            proc.kill()
            log.close()
    logs = [(tmp_path / f'node{r}.log').read_text()[-3000:] for r in (0, 1)]
    assert codes == [0, 0], '\n'.join(logs)
    assert 'Iter(train) [3/3]' in logs[0]
    dumps = [
        torch.load(tmp_path / f'rank{r}.pth', weights_only=False)
        for r in (0, 1)
    ]
    assert [d['world_size'] for d in dumps] == [2, 2]
    first, second = dumps[0]['state_dict'], dumps[1]['state_dict']
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key
