"""Mixed precision on CPU: bf16 autocast for ``--amp`` without a GPU.

mmengine's ``AmpOptimWrapper`` only runs on accelerators.  On CPU, bf16 has
float32's exponent range, so no loss scaling is needed: autocast alone does.
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
