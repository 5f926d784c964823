"""ONNX forms of the MSDeformAttn op for the ``torch.onnx`` exporter.

``torch.onnx.export(..., dynamo=True)`` traces a model with ``torch.export``,
where :func:`~projects_detr_plus.ops.multi_scale_deformable_attn` stays one
node, ``torch.ops.detr_plus.ms_deform_attn``.  :func:`msda_translation_table`
says how that node becomes ONNX (pass it as ``custom_translation_table``):

``'decompose'`` (default): standard ONNX operators only, so the file runs in
    any runtime without a plugin (ONNX Runtime, OpenVINO, TensorRT).  Per
    feature level ``l`` (the number of levels is static; the level sizes are
    read from ``spatial_shapes`` at run time, so one file serves every image
    size)::

        value_l  = Reshape(Slice(value, start_l, start_l + H_l * W_l))
                                      # (bs*heads, dims, H_l, W_l)
        grid_l   = 2 * sampling_locations[:, :, :, l] - 1
                                      # (bs*heads, queries, points, 2)
        out     += ReduceSum(GridSample(value_l, grid_l) * attn_l, points)

    with ``GridSample(mode='bilinear', padding_mode='zeros',
    align_corners=0)``, exactly the reference ``grid_sample`` path of
    :mod:`.msda`.  Operators: Shape, Gather, Slice, ReduceProd, Concat,
    Reshape, Transpose, Mul, Sub, Add, ReduceSum, CastLike, GridSample.

    Opsets: GridSample exists from opset 16; torch's exporter builds the
    graph at opset 18 (and uses LayerNormalization, opset 17) and only
    converts upwards, so files are opset 18 or newer.  Opset 20 renames
    GridSample's ``'bilinear'`` mode ``'linear'`` (the converter does it).

    Runtimes: ONNX Runtime runs GridSample natively (CPU: tested here),
    so does OpenVINO (not tested here).  TensorRT parses GridSample from
    8.5 on; its ONNX parser does not know the opset-20 name ``'linear'`` and
    silently samples nearest (NVIDIA/TensorRT#4646,
    onnx/onnx-tensorrt#1060): export at opset 18 (the default) for
    TensorRT.  Issue #18 also points at NVIDIA/TensorRT#4813 (GridSample in
    TensorRT, not checked here).  Compare an engine with ONNX Runtime
    before use, or emit the custom node with your own plugin.

``'custom'``: one node ``MSDeformAttn`` in domain :data:`CUSTOM_DOMAIN`
    (version 1) with the op's inputs and output (mmcv layouts, see
    :mod:`.msda`), for runtimes that bring their own kernel (e.g. a
    TensorRT plugin or an ONNX Runtime custom-op library).  ONNX Runtime
    without such a library refuses to load the file.

onnxscript (and onnx) are imported only when a table is built: this module
keeps :mod:`projects_detr_plus.ops` importable with torch alone.
"""
from typing import Callable, Dict

import torch

__all__ = [
    'MSDA_MODES', 'CUSTOM_DOMAIN', 'CUSTOM_OP', 'msda_translation_table'
]

MSDA_MODES = ('decompose', 'custom')
CUSTOM_DOMAIN = 'detr_plus'
CUSTOM_OP = 'MSDeformAttn'
# the opset the exporter's own translations use (torch.onnx builds at 18)
BUILD_OPSET = 18


def _decomposition(opset) -> Callable:
    """The standard-ONNX translation, built on onnxscript's ``opset``."""
    op = opset

    def ms_deform_attn_onnx(value, spatial_shapes, level_start_index,
                            sampling_locations, attention_weights):
        """MSDeformAttn from GridSample; shapes as in :mod:`.msda`.

        value (bs, keys, heads, dims), spatial_shapes (levels, 2) int64,
        level_start_index (levels,) int64, sampling_locations (bs, queries,
        heads, levels, points, 2), attention_weights (bs, queries, heads,
        levels, points) -> (bs, queries, heads * dims).
        """
        num_levels = attention_weights.shape[3]
        if not isinstance(num_levels, int):
            raise ValueError('the MSDeformAttn ONNX decomposition needs a '
                             'static number of feature levels')
        one = op.Constant(value_ints=[1])
        # dynamic sizes, each a (1,) int64 tensor
        bs = op.Shape(value, start=0, end=1)
        heads = op.Shape(value, start=2, end=3)
        dims = op.Shape(value, start=3, end=4)
        queries = op.Shape(sampling_locations, start=1, end=2)
        points = op.Shape(sampling_locations, start=4, end=5)
        bs_heads = op.Mul(bs, heads)
        # (bs, heads, dims, keys), (bs, heads, levels, queries, points, 2),
        # (bs, heads, levels, queries, points)
        value_t = op.Transpose(value, perm=[0, 2, 3, 1])
        loc_t = op.Transpose(sampling_locations, perm=[0, 2, 3, 1, 4, 5])
        attn_t = op.Transpose(attention_weights, perm=[0, 2, 3, 1, 4])
        grid_shape = op.Concat(
            bs_heads, queries, points, op.Constant(value_ints=[2]), axis=0)
        attn_shape = op.Concat(bs_heads, one, queries, points, axis=0)
        two = op.CastLike(op.Constant(value_float=2.0), sampling_locations)
        unit = op.CastLike(op.Constant(value_float=1.0), sampling_locations)
        out = None
        for level in range(num_levels):
            index = op.Constant(value_ints=[level])
            hw = op.Reshape(
                op.Gather(spatial_shapes, index, axis=0),
                op.Constant(value_ints=[2]))
            start = op.Gather(level_start_index, index, axis=0)
            end = op.Add(start, op.ReduceProd(hw, keepdims=1))
            value_l = op.Slice(value_t, start, end,
                               op.Constant(value_ints=[3]))
            value_l = op.Reshape(value_l,
                                 op.Concat(bs_heads, dims, hw, axis=0))
            grid_l = op.Reshape(op.Gather(loc_t, index, axis=2), grid_shape)
            grid_l = op.Sub(op.Mul(grid_l, two), unit)
            attn_l = op.Reshape(op.Gather(attn_t, index, axis=2), attn_shape)
            sampled = op.GridSample(
                value_l,
                grid_l,
                mode='bilinear',
                padding_mode='zeros',
                align_corners=0)
            # (bs*heads, dims, queries)
            level_out = op.ReduceSum(
                op.Mul(sampled, attn_l),
                op.Constant(value_ints=[3]),
                keepdims=0)
            out = level_out if out is None else op.Add(out, level_out)
        out = op.Reshape(out,
                         op.Concat(bs, op.Mul(heads, dims), queries, axis=0))
        return op.Transpose(out, perm=[0, 2, 1])

    return ms_deform_attn_onnx


def _register_custom_schema() -> None:
    """Declare ``detr_plus.MSDeformAttn`` (version 1) to onnx, once: the
    exporter and onnx's checker want a schema for every node."""
    import onnx
    from onnx.defs import OpSchema
    try:
        onnx.defs.get_schema(CUSTOM_OP, 1, CUSTOM_DOMAIN)
        return
    except onnx.defs.SchemaError:
        pass
    param = OpSchema.FormalParameter
    schema = OpSchema(
        CUSTOM_OP,
        CUSTOM_DOMAIN,
        1, 'Multi-scale deformable attention (mmcv layouts): value (bs, keys, '
        'heads, dims), spatial_shapes (levels, 2), level_start_index '
        '(levels,), sampling_locations (bs, queries, heads, levels, points, '
        '2), attention_weights (bs, queries, heads, levels, points) -> '
        '(bs, queries, heads * dims); bilinear, zeros outside.',
        inputs=[
            param('value', 'T'),
            param('spatial_shapes', 'tensor(int64)'),
            param('level_start_index', 'tensor(int64)'),
            param('sampling_locations', 'T'),
            param('attention_weights', 'T')
        ],
        outputs=[param('output', 'T')],
        type_constraints=[('T', [
            'tensor(float)', 'tensor(float16)', 'tensor(double)',
            'tensor(bfloat16)'
        ], 'floating-point tensors')])
    onnx.defs.register_schema(schema)


def _custom_node(opset) -> Callable:
    """The single custom-domain node translation."""
    from onnxscript import values
    _register_custom_schema()
    node = getattr(values.Opset(CUSTOM_DOMAIN, 1), CUSTOM_OP)

    def ms_deform_attn_custom(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights):
        """One ``detr_plus::MSDeformAttn`` node (inputs as the op's)."""
        return node(value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights)

    return ms_deform_attn_custom


def msda_translation_table(mode: str = 'decompose') -> Dict:
    """``custom_translation_table`` entry of the MSDeformAttn op.

    Args:
        mode (str): ``'decompose'`` (standard ONNX, GridSample) or
            ``'custom'`` (one ``detr_plus.MSDeformAttn`` node).

    Returns:
        dict: ``{torch.ops.detr_plus.ms_deform_attn.default: function}``
        for ``torch.onnx.export(..., dynamo=True,
        custom_translation_table=...)``.

    Raises:
        ValueError: for an unknown ``mode``.
        ImportError: when onnxscript is missing (``pip install
            projects_detr_plus[deploy]``).
    """
    if mode not in MSDA_MODES:
        raise ValueError(f'msda mode must be one of {MSDA_MODES}, got '
                         f'{mode!r}')
    try:
        import onnxscript
    except ImportError as error:
        raise ImportError(
            'exporting the MSDeformAttn op to ONNX needs onnxscript: install '
            'the deploy extra, `pip install "projects_detr_plus[deploy]"` '
            '(onnx, onnxruntime, onnxscript)') from error
    opset = getattr(onnxscript, f'opset{BUILD_OPSET}')
    build = _decomposition if mode == 'decompose' else _custom_node
    # importing the module registers the op (idempotent)
    from . import msda  # noqa: F401
    return {torch.ops.detr_plus.ms_deform_attn.default: build(opset)}
