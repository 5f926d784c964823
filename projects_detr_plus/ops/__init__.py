"""Compiled ops of DETR+ (importable with torch alone: no mmcv / mmdet).

``multi_scale_deformable_attn`` is the multi-scale deformable attention op
(mmcv layouts) backed by the compiled CPU / CUDA kernels of
``projects_detr_plus.ops._C`` when available and by a pure-PyTorch path
otherwise; see :mod:`projects_detr_plus.ops.msda`.

``distinct_indices`` / ``nms_keep`` / ``distinct_mask`` are DDQ's
distinct-query selection (class-agnostic NMS per image) and its ONNX
lowering; see :mod:`projects_detr_plus.ops.nms`.
"""
from .msda import (active_implementation, force_pytorch, implementation_info,
                   multi_scale_deformable_attn,
                   multi_scale_deformable_attn_pytorch)
from .nms import (distinct_indices, distinct_mask, exportable_iou_threshold,
                  nms_keep, nms_translation_table)
from .onnx_lowering import msda_translation_table

__all__ = [
    'multi_scale_deformable_attn',
    'multi_scale_deformable_attn_pytorch',
    'active_implementation',
    'force_pytorch',
    'implementation_info',
    'msda_translation_table',
    'distinct_indices',
    'distinct_mask',
    'nms_keep',
    'exportable_iou_threshold',
    'nms_translation_table',
]
