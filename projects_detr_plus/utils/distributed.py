"""Distributed training on CPU-only machines (gloo) through mmengine.

mmengine 0.10.7's PyTorch launcher always calls ``torch.cuda.set_device``
(which fails without CUDA) and wraps the model in DDP with
``device_ids=[LOCAL_RANK]`` (which DDP rejects for a CPU model).  Importing
the plugin makes both work on a machine without an accelerator:

* the process group is initialised with the gloo backend (nccl needs CUDA);
* DDP gets ``device_ids=None`` for a model whose parameters are on the CPU.

With CUDA (or another accelerator) mmengine's code runs unchanged.
"""
import functools

import torch
import torch.distributed as torch_dist
from mmengine.dist import utils as dist_utils
from mmengine.logging import print_log
from mmengine.model.wrappers import MMDistributedDataParallel

_PATCHED = '_detr_plus_cpu_fallback'


def _has_accelerator():
    from mmengine.device import (is_mlu_available, is_musa_available,
                                 is_npu_available)
    return (torch.cuda.is_available() or is_mlu_available()
            or is_npu_available() or is_musa_available())


def _init_dist_pytorch_cpu_aware(original,
                                 backend,
                                 init_backend='torch',
                                 **kwargs):
    if _has_accelerator() or init_backend != 'torch':
        return original(backend, init_backend=init_backend, **kwargs)
    if backend != 'gloo':
        print_log(
            f'no CUDA device: distributed backend {backend!r} -> '
            "'gloo'",
            logger='current')
    torch_dist.init_process_group(backend='gloo', **kwargs)


def _ddp_init_cpu_aware(original, self, module, *args, **kwargs):
    on_cpu = all(p.device.type == 'cpu' for p in module.parameters())
    if on_cpu and kwargs.get('device_ids') is not None:
        kwargs['device_ids'] = None
    original(self, module, *args, **kwargs)


def install_cpu_distributed_fallback():
    """Patch mmengine's launcher and DDP wrapper (once)."""
    if getattr(dist_utils._init_dist_pytorch, _PATCHED, False):
        return
    launcher = functools.partial(_init_dist_pytorch_cpu_aware,
                                 dist_utils._init_dist_pytorch)
    setattr(launcher, _PATCHED, True)
    dist_utils._init_dist_pytorch = launcher
    ddp_init = MMDistributedDataParallel.__init__

    @functools.wraps(ddp_init)
    def init(self, module, *args, **kwargs):
        _ddp_init_cpu_aware(ddp_init, self, module, *args, **kwargs)

    MMDistributedDataParallel.__init__ = init


def leave_process_group():
    """Wait for every rank, then destroy the process group (no-op alone).

    Without it each rank tears gloo down at interpreter exit in its own time;
    a rank whose peer has already closed its sockets can abort (SIGABRT) and
    fail the launch although training finished.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()
