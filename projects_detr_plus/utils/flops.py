"""FLOP count of the MSDeformAttn op for mmengine's complexity analysis.

mmengine (``get_model_complexity_info``, mmdet's ``get_flops`` tool) counts
ops it has no handle for as zero.  Importing the plugin registers one for
``detr_plus::ms_deform_attn``: per query, head, level and point, bilinear
sampling of ``head_dims`` channels (4 multiply-adds each) and their weighting
by the attention weight (1 more), i.e. ``5 * bs * num_queries * num_heads *
num_levels * num_points * head_dims`` multiply-adds (mmengine counts one
multiply-add as one flop).
"""
from mmengine.analysis import complexity_analysis
from mmengine.analysis.jit_handles import get_shape

OP_NAME = 'detr_plus::ms_deform_attn'
MACS_PER_SAMPLE = 5


def ms_deform_attn_flop_jit(inputs, outputs):
    """Multiply-adds of one traced call (inputs as the op's schema)."""
    value_shape = get_shape(inputs[0])  # (bs, num_keys, heads, head_dims)
    weights_shape = get_shape(inputs[4])  # (bs, nq, heads, levels, points)
    samples = 1
    for size in weights_shape:
        samples *= size
    return samples * value_shape[-1] * MACS_PER_SAMPLE


def install_flop_handle():
    """Add the handle to mmengine's default FLOP handles (once)."""
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.setdefault(
        OP_NAME, ms_deform_attn_flop_jit)
