"""DDP on CPU (gloo): gradients equal a single process over the global batch,
ranks without ground truth, and tools/dist_train.sh end to end."""
import copy
import os.path as osp

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import Config

from conftest import REPO_ROOT, run_tool
from detr_testing import (build, ddq_cfg, dino_cfg, make_batch,
                          parameters_without_grad)

CO_DINO = Config.fromfile(
    osp.join(REPO_ROOT, 'configs/shapes/co-dino-tiny_shapes.py'))
BRANCHES = (
    dict(type='GroupQueryBranch', num_groups=2),
    dict(type='HybridMatchingBranch', num_queries=30, k_one_to_many=2),
    # zero padding (the official use_zero_padding): the default
    # random negatives pad each image to its own batch's count,
    # which a rank's half batch and the global batch draw differently
    dict(
        type='CollaborativeBranch',
        name='co_atss',
        aux_head=CO_DINO.atss_head.to_dict(),
        zero_padding=True))
WORLD = 2


def _cfg(dn, model='branches'):
    if model == 'ddq':  # NMS-selected queries, dense one-to-many branch
        cfg = ddq_cfg(dims=128, dn=dn, suppressed='isolated')
    else:
        cfg = dino_cfg(
            dims=128,
            dn=dn,
            branches=BRANCHES,
            assigner='GroupOneToOneAssigner')
    cfg['backbone']['norm_eval'] = True  # BN batch statistics are per rank
    return cfg


def _grads(model):
    return {
        name: p.grad.detach().clone()
        for name, p in model.named_parameters() if p.grad is not None
    }


def _step(model, forward, batch):
    inputs, samples = batch
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=copy.deepcopy(samples)),
        training=True)
    losses = forward(data['inputs'], data['data_samples'], mode='loss')
    loss, _ = model.parse_losses(losses)
    model.zero_grad(set_to_none=True)
    loss.backward()


def _worker(rank, init_file, cfg, rank_batches, out):
    dist.init_process_group(
        'gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = build(cfg)
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        unused = []
        for step, batches in enumerate(rank_batches):
            torch.manual_seed(100 + step)
            _step(model, ddp, batches[rank])
            unused += parameters_without_grad(model)
            if step == 0:
                first = _grads(model)
        torch.save(dict(grads=first, unused=unused), out.format(rank=rank))
    finally:
        dist.destroy_process_group()


def _run_ddp(tmp_path, cfg, rank_batches):
    out = str(tmp_path / 'rank{rank}.pt')
    mp.spawn(
        _worker,
        args=(str(tmp_path / 'init'), cfg, rank_batches, out),
        nprocs=WORLD,
        join=True)
    return [torch.load(out.format(rank=r)) for r in range(WORLD)]


def _split(inputs, samples):
    half = len(samples) // WORLD
    return [(inputs[r * half:(r + 1) * half], samples[r * half:(r + 1) * half])
            for r in range(WORLD)]


def test_ddp_gradients_equal_single_process_on_global_batch(tmp_path):
    """Group + hybrid + collaborative (ATSS, zero padding) branches, no
    denoising noise: the box-count normalisations are averaged across ranks
    and the padding of the positive queries is invisible, so DDP's averaged
    gradient is the gradient of the global batch.

    (Not DDQ: mmdet's ``DDQAuxLoss`` clamps its rank-averaged normaliser to
    at least 1, which an untrained model's alignment metrics stay below, so
    there DDP gives half the dense loss of one process on two ranks.)"""
    cfg = _cfg(dn=False)
    inputs, samples = make_batch(num_gts=(3, 1, 6, 2), seed=4)
    results = _run_ddp(tmp_path, cfg, [_split(inputs, samples)])
    torch.manual_seed(0)
    single = build(cfg)
    single.train()
    torch.manual_seed(100)
    _step(single, single, (inputs, samples))
    expected = _grads(single)
    for rank_result in results:
        got = rank_result['grads']
        assert set(got) == set(expected)
        for name, grad in expected.items():
            scale = float(grad.abs().max()) + 1e-12
            torch.testing.assert_close(
                got[name], grad, rtol=1e-3, atol=1e-4 * scale, msg=name)


@pytest.mark.parametrize('model', ['branches', 'ddq'])
def test_ddp_rank_without_ground_truth(tmp_path, model):
    """Rank 1 has no boxes at all, denoising on: two steps run (DDP checks
    for unused parameters on the second) and every parameter gets a
    gradient on both ranks."""
    cfg = _cfg(dn=True, model=model)
    steps = []
    for seed in (0, 1):
        with_gt = make_batch(num_gts=(4, 2), seed=seed)
        without = make_batch(num_gts=(0, 0), seed=seed + 10)
        steps.append([with_gt, without])
    results = _run_ddp(tmp_path, cfg, steps)
    for rank_result in results:
        assert rank_result['unused'] == []
    torch.testing.assert_close(results[0]['grads'], results[1]['grads'])


@pytest.mark.parametrize('config', [
    'dino-tiny_shapes.py', 'deformable-detr-tiny_shapes.py',
    'group-dino-tiny_shapes.py', 'h-dino-tiny_shapes.py',
    'co-dino-tiny_shapes.py', 'ddq-detr-tiny_shapes.py',
    'h-deformable-detr-tiny_shapes.py', 'ddq-fcn-tiny_shapes.py',
    'ddq-rcnn-tiny_shapes.py'
])
def test_dist_train_script_on_cpu(repo_root, tmp_path, config):
    """tools/dist_train.sh, 2 gloo processes, sparse data (many images
    without boxes), 2 iterations and the final evaluation."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    work_dir = tmp_path / 'work'
    proc = run_tool([
        '-c',
        'import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))',
        'bash',
        osp.join(repo_root, 'tools/dist_train.sh'),
        osp.join(repo_root, 'configs/shapes', config), '2', '--work-dir',
        str(work_dir), '--cfg-options', 'train_cfg.max_iters=2',
        'train_dataloader.batch_size=2',
        'train_dataloader.dataset.num_images=12',
        'train_dataloader.dataset.shapes_cfg.min_objects=0',
        'train_dataloader.dataset.shapes_cfg.mean_objects=0.5',
        'val_dataloader.dataset.num_images=4',
        'test_dataloader.dataset.num_images=4',
        'default_hooks.logger.interval=1'
    ],
                    cwd=tmp_path,
                    env=dict(PORT=str(port)))
    log = proc.stdout + proc.stderr
    assert "backend 'nccl' -> 'gloo'" in log
    assert 'Iter(train) [2/2]' in log and 'coco/bbox_mAP' in log
