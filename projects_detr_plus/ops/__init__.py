"""Compiled ops of DETR+ (importable with torch alone: no mmcv / mmdet).

``multi_scale_deformable_attn`` is the multi-scale deformable attention op
(mmcv layouts) backed by the compiled CPU / CUDA kernels of
``projects_detr_plus.ops._C`` when available and by a pure-PyTorch path
otherwise; see :mod:`projects_detr_plus.ops.msda`.
"""
from .msda import (active_implementation, force_pytorch, implementation_info,
                   multi_scale_deformable_attn,
                   multi_scale_deformable_attn_pytorch)
from .onnx_lowering import msda_translation_table

__all__ = [
    'multi_scale_deformable_attn', 'multi_scale_deformable_attn_pytorch',
    'active_implementation', 'force_pytorch', 'implementation_info',
    'msda_translation_table',
]
