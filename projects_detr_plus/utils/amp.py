"""Mixed precision on CPU: bf16 autocast for ``--amp`` without a GPU.

mmengine's ``AmpOptimWrapper`` only runs on accelerators.  On CPU, bf16 has
float32's exponent range, so no loss scaling is needed: autocast alone does.
:func:`fp32_for_mmcv` keeps bf16 away from mmcv's kernels, which lack it.
"""
from contextlib import contextmanager

import torch
from mmdet.registry import OPTIM_WRAPPERS
from mmengine.optim import OptimWrapper


@OPTIM_WRAPPERS.register_module()
class CPUBF16AutocastOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under CPU bf16 autocast."""

    @contextmanager
    def optim_context(self, model):
        with super().optim_context(model), torch.autocast(
                'cpu', dtype=torch.bfloat16):
            yield


@contextmanager
def fp32_for_mmcv(feats):
    """Run a block that feeds ``feats`` to mmcv's RoIAlign / NMS in a dtype
    they take.

    mmcv's RoIAlign and NMS have no bf16 kernels (NMS takes fp32 boxes
    only; on the CPU, bf16 autocast leaves them bf16).  Where bf16 would
    reach them (a bf16 tensor in ``feats``, or bf16 autocast on their
    device, i.e. ``--amp`` on the CPU) the block runs with that device's
    autocast off and gets ``feats`` in fp32.  Elsewhere (fp32, fp16
    autocast on a GPU) it gets ``feats`` unchanged and autocast is left as
    it is.

    Args:
        feats (Sequence[Tensor]): e.g. a pyramid, per level
            (B, C, H_l, W_l).

    Yields:
        tuple[Tensor]: the features for the block.
    """
    device = feats[0].device.type
    bf16 = any(
        f.dtype == torch.bfloat16
        for f in feats) or (torch.is_autocast_enabled(device) and
                            torch.get_autocast_dtype(device) == torch.bfloat16)
    if not bf16:
        yield tuple(feats)
        return
    with torch.autocast(device_type=device, enabled=False):
        yield tuple(f.float() for f in feats)
