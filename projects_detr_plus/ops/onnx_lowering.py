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

``'gather'``: standard ONNX operators without GridSample, for runtimes or
    converters that lack it (same dynamic level sizes, static number of
    levels and points).  Each level's map is zero-padded (1 row and column
    before, 2 after) into one row table; for every point the pixel
    coordinate ``loc * W - 0.5`` (align_corners=0) is clamped to [-1, W]
    (beyond that every corner is padding), floored, and its 4 corners'
    rows and weights (bilinear x attention) are computed once, not once
    per channel as GridSample does; then per level::

        rows_l    (bs, queries, heads, 4 * points)          int64
        weights_l (bs, queries, heads, 1, 4 * points)
        out      += MatMul(weights_l, Gather(table, rows_l))
                                      # (bs, queries, heads, 1, dims)

    Operators: Shape, Gather, Slice, Pad, Concat, Reshape, Transpose,
    Split, CumSum, Range, Squeeze, Unsqueeze, ReduceProd, Mul, Add, Sub,
    Min, Max, Floor, IsNaN, Where, Cast, MatMul (CastLike and Neg on
    constants, which the exporter's optimiser folds).  Keys are
    computed in the float type and exact below 2**24 padded keys per
    image; NaN locations sample zeros (as the compiled kernel does, where
    ``grid_sample`` gives NaN).  Matches the op to 2.2e-6 (float32, the
    op tests' shapes).

``'custom'``: one node ``MSDeformAttn`` in domain :data:`CUSTOM_DOMAIN`
    (version 1) with the op's inputs and output (mmcv layouts, see
    :mod:`.msda`), for runtimes that bring their own kernel (e.g. a
    TensorRT plugin or an ONNX Runtime custom-op library).  ONNX Runtime
    without such a library refuses to load the file.

Which is faster, measured 2026-12-08 in ONNX Runtime 1.32 (CPU, one
thread, a 2-core AMD EPYC shared with two training processes; medians of
interleaved calls): ``'decompose'``, so it stays the default.  ``'gather'``
must write 4 corners x dims floats per point (356 MB per DINO R50 encoder
layer at 512 px, batch 1) where GridSample writes one interpolated value
per channel, and ONNX Runtime has no fused gather-and-sum operator.

* The op alone (exported by itself; the "realistic" inputs of
  ``benchmarks/msda_op.py``: DINO R50 at 512 px, 8 heads x 32 dims, 4
  levels x 4 points), decompose / gather / PyTorch's compiled kernel:
  encoder (5440 queries) batch 1 57 / 61 / 12 ms, batch 8 482 / 617 /
  111 ms; decoder (900 queries) batch 1 10.7 / 11.9 / 4.1 ms.
* Whole files (``benchmarks/onnx_runtime.py --msda decompose gather
  --threads 1``, commands in ``docs/deployment.md``), ONNX Runtime's
  speed-up over PyTorch ``predict``, decompose / gather: dino-tiny 128 px
  batch 1 1.50x / 1.28x, batch 8 1.11x / 0.85x; dino-r50 512 px batch 1
  1.36x / 1.34x, batch 8 1.73x / 1.76x (3 timed calls: within noise).

Variants of ``'gather'`` that were slower still: all levels in one Gather
(a 4x larger intermediate), Mul + ReduceSum instead of MatMul, the
coordinates in the op's layout (ONNX Runtime is slow at broadcasts over a
short innermost axis, which the level-major layout here avoids).

onnxscript (and onnx) are imported only when a table is built: this module
keeps :mod:`projects_detr_plus.ops` importable with torch alone.
"""
from typing import Callable, Dict

import torch

__all__ = [
    'MSDA_MODES', 'CUSTOM_DOMAIN', 'CUSTOM_OP', 'msda_translation_table'
]

MSDA_MODES = ('decompose', 'gather', 'custom')
CUSTOM_DOMAIN = 'detr_plus'
CUSTOM_OP = 'MSDeformAttn'
# the opset the exporter's own translations use (torch.onnx builds at 18)
BUILD_OPSET = 18
INT64 = 7  # onnx.TensorProto.INT64


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


def _gather_lowering(opset) -> Callable:
    """The standard-ONNX translation on Gather + MatMul (mode ``'gather'``),
    built on onnxscript's ``opset``."""
    op = opset

    def size(tensor, axis):
        """``tensor.shape[axis]`` as a (1,) int64 tensor."""
        return op.Shape(tensor, start=axis, end=axis + 1)

    def ints(*values):
        """A constant 1-D int64 tensor."""
        return op.Constant(value_ints=list(values))

    def split(tensor, parts, axis):
        """``tensor`` in ``parts`` equal pieces along ``axis`` (a list)."""
        if parts == 1:
            return [tensor]
        return list(op.Split(tensor, num_outputs=parts, axis=axis))

    def stack_last(*tensors):
        """``tensors`` (same shape) stacked along a new last axis."""
        last = ints(-1)
        return op.Concat(*[op.Unsqueeze(t, last) for t in tensors], axis=-1)

    def padded_table(value, spatial_shapes, level_start_index, num_levels):
        """The value rows every corner is gathered from.

        Each level's (H, W) map gets zero rows and columns around it (1
        above and left, 2 below and right: the corners of points clamped
        by :func:`pixels`), so that no corner needs a validity mask.

        Returns:
            (table, padded_keys): table (bs * padded_keys * heads, dims),
            row ``(b * padded_keys + k) * heads + h`` holds key ``k`` of
            head ``h`` of image ``b``; padded_keys = sum (H + 3) (W + 3),
            a (1,) int64 tensor.
        """
        bs, dims = size(value, 0), size(value, 3)
        channels = op.Mul(size(value, 2), dims)
        flat = op.Reshape(value, op.Concat(bs, ints(-1), channels, axis=0))
        levels = []
        for level in range(num_levels):
            index = ints(level)
            hw = op.Reshape(op.Gather(spatial_shapes, index, axis=0), ints(2))
            start = op.Gather(level_start_index, index, axis=0)
            end = op.Add(start, op.ReduceProd(hw, keepdims=1))
            level_map = op.Reshape(
                op.Slice(flat, start, end, ints(1)),
                op.Concat(bs, hw, channels, axis=0))  # (bs, H, W, C)
            level_map = op.Pad(level_map, ints(0, 1, 1, 0, 0, 2, 2, 0))
            levels.append(
                op.Reshape(level_map,
                           op.Concat(bs, ints(-1), channels, axis=0)))
        table = op.Concat(*levels, axis=1)  # (bs, padded_keys, C)
        return (op.Reshape(table, op.Concat(ints(-1), dims,
                                            axis=0)), size(table, 1))

    def pixels(loc, spatial_shapes):
        """Clamped pixel coordinates of the sampling points, level-major
        (so that per-level constants broadcast over whole blocks: ONNX
        Runtime is slow at broadcasts over a short innermost axis).

        loc (bs, queries, heads, levels, points, 2) in [0, 1] -> (levels,
        2, bs, queries, heads, points): x, y with pixel centres at integers
        (``align_corners=False``), clamped to [-1, W] x [-1, H]; a point
        that far out samples only zero padding, as in ``grid_sample``.
        NaN becomes -1 (zeros, as the compiled kernel samples).
        """
        num_levels = loc.shape[3]
        wh = op.Reshape(
            op.CastLike(op.Gather(spatial_shapes, ints(1, 0), axis=1), loc),
            ints(num_levels, 2, 1, 1, 1, 1))
        one = op.CastLike(op.Constant(value_float=1.0), loc)
        half = op.CastLike(op.Constant(value_float=0.5), loc)
        loc_t = op.Transpose(loc, perm=[3, 5, 0, 1, 2, 4])
        loc_t = op.Where(op.IsNaN(loc_t), op.Neg(one), loc_t)
        pixel = op.Sub(op.Mul(loc_t, wh), half)
        return op.Min(op.Max(pixel, op.Neg(one)), wh)

    def corner_rows(low, spatial_shapes, value, padded_keys, num_levels):
        """Rows of :func:`padded_table` of the 4 corners of every point.

        low (levels, 2, bs, queries, heads, points): floored x, y of
        :func:`pixels` -> (levels, 1, bs, queries, heads, points, 4)
        int64, corners (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 +
        1).  The key (float32, exact below 2**24 padded keys per image) of
        pixel (y, x) of a level is y * Wp + x + first + Wp + 1, with Wp =
        W + 3 and ``first`` the level's first padded key.
        """
        per_level = ints(num_levels, 1, 1, 1, 1, 1)
        padded = op.Add(spatial_shapes, ints(3, 3))  # (levels, 2)
        width = op.Gather(padded, op.Constant(value_int=1), axis=1)
        first = op.CumSum(
            op.ReduceProd(padded, ints(1), keepdims=0),
            op.Constant(value_int=0),
            exclusive=1)
        base = op.Add(op.Add(first, width), op.Constant(value_int=1))
        x0, y0 = split(low, 2, axis=1)
        key = op.Add(
            op.Add(
                op.Mul(y0, op.Reshape(op.CastLike(width, low), per_level)),
                x0), op.Reshape(op.CastLike(base, low), per_level))
        bs, heads = size(value, 0), size(value, 2)
        image = op.Mul(
            op.Range(
                op.Constant(value_int=0), op.Squeeze(bs),
                op.Constant(value_int=1)), op.Mul(padded_keys, heads))
        head = op.Range(
            op.Constant(value_int=0), op.Squeeze(heads),
            op.Constant(value_int=1))
        offset = op.Reshape(
            op.Add(op.Unsqueeze(image, ints(1)), op.Unsqueeze(head, ints(0))),
            op.Concat(ints(1, 1), bs, ints(1), heads, ints(1), axis=0))
        row = op.Add(op.Mul(op.Cast(key, to=INT64), heads), offset)
        right = op.Add(row, heads)
        down = op.Reshape(op.Mul(width, heads), per_level)
        return stack_last(row, right, op.Add(row, down), op.Add(right, down))

    def corner_weights(frac, attn):
        """Bilinear weights x attention weights of the 4 corners.

        frac (levels, 2, bs, queries, heads, points): x, y minus their
        floor; attn (bs, queries, heads, levels, points) -> (levels, 1, bs,
        queries, heads, points, 4), corners as :func:`corner_rows`.
        """
        one = op.CastLike(op.Constant(value_float=1.0), frac)
        fx, fy = split(frac, 2, axis=1)
        attn_t = op.Unsqueeze(
            op.Transpose(attn, perm=[3, 0, 1, 2, 4]), ints(1))
        gx = op.Sub(one, fx)
        gy = op.Mul(op.Sub(one, fy), attn_t)
        fy = op.Mul(fy, attn_t)
        return stack_last(
            op.Mul(gy, gx), op.Mul(gy, fx), op.Mul(fy, gx), op.Mul(fy, fx))

    def ms_deform_attn_gather(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights):
        """MSDeformAttn from Gather + MatMul; shapes as in :mod:`.msda`.

        value (bs, keys, heads, dims), spatial_shapes (levels, 2) int64,
        level_start_index (levels,) int64, sampling_locations (bs, queries,
        heads, levels, points, 2), attention_weights (bs, queries, heads,
        levels, points) -> (bs, queries, heads * dims).
        """
        num_levels = attention_weights.shape[3]
        points = attention_weights.shape[4]
        if not isinstance(num_levels, int) or not isinstance(points, int):
            raise ValueError('the MSDeformAttn ONNX gather lowering needs a '
                             'static number of levels and points')
        table, padded_keys = padded_table(value, spatial_shapes,
                                          level_start_index, num_levels)
        pixel = pixels(sampling_locations, spatial_shapes)
        low = op.Floor(pixel)
        rows = corner_rows(low, spatial_shapes, value, padded_keys, num_levels)
        weights = corner_weights(op.Sub(pixel, low), attention_weights)
        bs, heads = size(value, 0), size(value, 2)
        queries = size(sampling_locations, 1)
        prefix = op.Concat(bs, queries, heads, axis=0)
        rows_shape = op.Concat(prefix, ints(4 * points), axis=0)
        weights_shape = op.Concat(prefix, ints(1, 4 * points), axis=0)
        out = None
        # one level at a time: the gathered rows of all levels at once
        # would be 4x larger (356 MB per DINO R50 encoder layer at 512 px)
        for rows_l, weights_l in zip(
                split(rows, num_levels, axis=0),
                split(weights, num_levels, axis=0)):
            gathered = op.Gather(
                table, op.Reshape(rows_l, rows_shape),
                axis=0)  # (bs, queries, heads, 4 * points, dims)
            level_out = op.MatMul(
                op.Reshape(weights_l, weights_shape), gathered)
            out = level_out if out is None else op.Add(out, level_out)
        return op.Reshape(
            out, op.Concat(bs, queries, op.Mul(heads, size(value, 3)), axis=0))

    return ms_deform_attn_gather


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
        mode (str): one of :data:`MSDA_MODES`: ``'decompose'`` (standard
            ONNX, GridSample), ``'gather'`` (standard ONNX, Gather +
            MatMul, no GridSample) or ``'custom'`` (one
            ``detr_plus.MSDeformAttn`` node).

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
    build = dict(
        decompose=_decomposition, gather=_gather_lowering,
        custom=_custom_node)[mode]
    # importing the module registers the op (idempotent)
    from . import msda  # noqa: F401
    return {torch.ops.detr_plus.ms_deform_attn.default: build(opset)}
