"""Multi-scale deformable attention (MSDeformAttn) as a ``torch.library`` op.

Public entry point: :func:`multi_scale_deformable_attn`, with mmcv's layouts::

    value               (bs, num_keys, num_heads, head_dims)
    spatial_shapes      (num_levels, 2) integer, rows (H, W)
    level_start_index   (num_levels,) integer
    sampling_locations  (bs, num_queries, num_heads, num_levels, num_points, 2)
                        as (x, y), [0, 1] covers the feature map
    attention_weights   (bs, num_queries, num_heads, num_levels, num_points)
    -> output           (bs, num_queries, num_heads * head_dims)

It calls the custom op ``torch.ops.detr_plus.ms_deform_attn`` (fake and
autograd registered, so it works with ``torch.compile(fullgraph=True)``,
``torch.export`` and ``torch.library.opcheck``). The op runs the compiled
CPU / CUDA kernels of ``projects_detr_plus.ops._C`` when they are available.
Otherwise, on a GPU, it runs mmcv's compiled CUDA kernel when mmcv has one
(computing in float32 for 16-bit values), and else, or on the CPU, the
pure-PyTorch path (``grid_sample``, the same maths as mmcv's
``multi_scale_deformable_attn_pytorch``); each fallback warns once, naming
the problem. The PyTorch path also runs when asked to:
``force_pytorch()`` or the environment variable
``DETR_PLUS_MSDA_IMPL=pytorch`` (``compiled`` makes a missing extension an
error, ``auto`` is the default).

Dtypes: float32 and float64 everywhere; float16 / bfloat16 values are computed
with float32 accumulation (sampling_locations and attention_weights are used
in float32). The output has value's dtype.
"""
import math
import os
import threading
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._ext import ext_cpu_isa, ext_error, ext_has_cuda, load_ext

__all__ = [
    'multi_scale_deformable_attn',
    'multi_scale_deformable_attn_pytorch',
    'active_implementation',
    'force_pytorch',
    'implementation_info',
]

ENV_IMPL = 'DETR_PLUS_MSDA_IMPL'
_REDUCED = (torch.float16, torch.bfloat16)
_lock = threading.Lock()
_state = {'forced': None, 'warned': set(), 'selftest': {}}


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
def _check_args(value: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> None:
    """Metadata-only checks (ranks, sizes, dtypes, devices): no device sync."""
    named = dict(
        value=value,
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        sampling_locations=sampling_locations,
        attention_weights=attention_weights)
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f'{name} must be a torch.Tensor, got '
                            f'{type(tensor).__name__}')
    if value.dim() != 4:
        raise ValueError('value must be 4-D (bs, num_keys, num_heads, '
                         f'head_dims), got shape {tuple(value.shape)}')
    if not value.is_floating_point():
        raise ValueError(f'value must be floating point, got {value.dtype}')
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError('spatial_shapes must have shape (num_levels, 2), '
                         f'got {tuple(spatial_shapes.shape)}')
    for name in ('spatial_shapes', 'level_start_index'):
        if named[name].is_floating_point() or named[name].is_complex():
            raise ValueError(f'{name} must be an integer tensor, got '
                             f'{named[name].dtype}')
    bs, _, num_heads, _ = value.shape
    num_levels = spatial_shapes.shape[0]
    if level_start_index.dim() != 1 or \
            level_start_index.shape[0] != num_levels:
        raise ValueError(f'level_start_index must have shape ({num_levels},)'
                         f', got {tuple(level_start_index.shape)}')
    loc = sampling_locations
    if loc.dim() != 6 or loc.shape[-1] != 2:
        raise ValueError('sampling_locations must be 6-D (bs, num_queries, '
                         'num_heads, num_levels, num_points, 2), got shape '
                         f'{tuple(loc.shape)}')
    if loc.shape[0] != bs or loc.shape[2] != num_heads or \
            loc.shape[3] != num_levels:
        raise ValueError(f'sampling_locations shape {tuple(loc.shape)} does '
                         f'not match value {tuple(value.shape)} (bs, '
                         'num_heads) and spatial_shapes (num_levels='
                         f'{num_levels})')
    if attention_weights.shape != loc.shape[:5]:
        raise ValueError('attention_weights must have shape '
                         f'{tuple(loc.shape[:5])}, got '
                         f'{tuple(attention_weights.shape)}')
    for name in ('sampling_locations', 'attention_weights'):
        tensor = named[name]
        if tensor.device != value.device:
            raise ValueError(f'{name} is on {tensor.device} but value is on '
                             f'{value.device}')
        amp = value.dtype in _REDUCED and tensor.dtype == torch.float32
        if tensor.dtype != value.dtype and not amp:
            raise ValueError(f'{name} has dtype {tensor.dtype} but value has '
                             f'{value.dtype} (use the same dtype, or float32 '
                             'with a float16/bfloat16 value)')


def _check_index_values(spatial_shapes: Tensor, level_start_index: Tensor,
                        num_keys: int) -> List[Tuple[int, int]]:
    """Value checks of the index tensors; returns [(H, W), ...].

    Reads the tensors (a device sync for CUDA tensors), so the op only calls
    it where the values are needed anyway or the tensors are on the CPU.
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    total = 0
    for level, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h < 0 or w < 0:
            raise ValueError('spatial_shapes must be non-negative, level '
                             f'{level} is ({h}, {w})')
        if start != total:
            raise ValueError(f'level_start_index[{level}] is {start} but '
                             f'spatial_shapes gives {total}')
        total += h * w
    if total != num_keys:
        raise ValueError(f'sum(H*W) over spatial_shapes is {total} but value '
                         f'has num_keys={num_keys}')
    return shapes


# --------------------------------------------------------------------------
# Pure-PyTorch path
# --------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _REDUCED else dtype


def _level_inputs(value: Tensor, loc: Tensor, attn: Tensor, level: int,
                  start: int, hw: Tuple[int, int]):
    """grid_sample inputs of one level.

    Returns value_l (bs*nh, D, H, W), grid_l (bs*nh, nq, np, 2) in [-1, 1]
    and attn_l (bs*nh, 1, nq, np).
    """
    bs, _, nh, dims = value.shape
    nq, npts = loc.shape[1], loc.shape[4]
    h, w = hw
    value_l = value[:, start:start + h * w].permute(0, 2, 3, 1)
    value_l = value_l.reshape(bs * nh, dims, h, w)
    grid_l = loc[:, :, :, level].transpose(1, 2).reshape(bs * nh, nq, npts, 2)
    attn_l = attn[:, :, :, level].transpose(1, 2).reshape(bs * nh, 1, nq, npts)
    return value_l, grid_l * 2 - 1, attn_l


def _sample(value_l: Tensor, grid_l: Tensor) -> Tensor:
    """Bilinear samples (bs*nh, D, nq, np), zeros outside the map."""
    return F.grid_sample(
        value_l,
        grid_l,
        mode='bilinear',
        padding_mode='zeros',
        align_corners=False)


def multi_scale_deformable_attn_pytorch(value: Tensor, spatial_shapes: Tensor,
                                        sampling_locations: Tensor,
                                        attention_weights: Tensor) -> Tensor:
    """Reference MSDeformAttn on ``grid_sample`` (mmcv's signature).

    Differentiable through autograd. Shapes as in the module docstring; the
    result is (bs, num_queries, num_heads * head_dims). Reads spatial_shapes
    values (a device sync on CUDA).
    """
    bs, _, nh, dims = value.shape
    nq = sampling_locations.shape[1]
    out = value.new_zeros(bs * nh, dims, nq)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        if h * w > 0:
            value_l, grid_l, attn_l = _level_inputs(value, sampling_locations,
                                                    attention_weights, level,
                                                    start, (h, w))
            out = out + (_sample(value_l, grid_l) * attn_l).sum(-1)
        start += h * w
    return out.view(bs, nh * dims, nq).transpose(1, 2).contiguous()


def _pytorch_forward(value: Tensor, spatial_shapes: Tensor,
                     sampling_locations: Tensor,
                     attention_weights: Tensor) -> Tensor:
    """Reference path in the compute dtype (float32 for 16-bit values)."""
    ct = _compute_dtype(value.dtype)
    out = multi_scale_deformable_attn_pytorch(
        value.to(ct), spatial_shapes, sampling_locations.to(ct),
        attention_weights.to(ct))
    return out.to(value.dtype)


def _pytorch_backward(grad_output: Tensor, value: Tensor,
                      shapes: List[Tuple[int, int]],
                      sampling_locations: Tensor, attention_weights: Tensor):
    """Gradients of the reference path via aten.grid_sampler_2d_backward.

    No autograd graph is needed (the op body runs below autograd).
    Returns grad_value, grad_sampling_locations, grad_attention_weights.
    """
    ct = _compute_dtype(value.dtype)
    bs, nk, nh, dims = value.shape
    _, nq, _, nl, npts, _ = sampling_locations.shape
    v, loc, attn = (
        t.to(ct) for t in (value, sampling_locations, attention_weights))
    # (bs, nq, nh*D) -> (bs*nh, D, nq, 1)
    go = grad_output.to(ct).reshape(bs, nq, nh, dims).permute(0, 2, 3, 1)
    go = go.reshape(bs * nh, dims, nq, 1)
    grad_value = v.new_zeros(bs, nk, nh, dims)
    grad_grid = loc.new_zeros(bs * nh, nq, nl, npts, 2)
    grad_attn = attn.new_zeros(bs * nh, nq, nl, npts)
    start = 0
    for level, (h, w) in enumerate(shapes):
        if h * w > 0 and go.numel() > 0:
            value_l, grid_l, attn_l = _level_inputs(v, loc, attn, level, start,
                                                    (h, w))
            grad_attn[:, :, level] = (_sample(value_l, grid_l) * go).sum(1)
            gv, gg = torch.ops.aten.grid_sampler_2d_backward(
                go * attn_l, value_l, grid_l, 0, 0, False, [True, True])
            grad_value[:, start:start + h * w] = gv.view(bs, nh, dims,
                                                         h * w).permute(
                                                             0, 3, 1, 2)
            grad_grid[:, :, level] = gg
        start += h * w
    grad_loc = (grad_grid * 2).view(bs, nh, nq, nl, npts, 2).transpose(1, 2)
    grad_attn = grad_attn.view(bs, nh, nq, nl, npts).transpose(1, 2)
    return (grad_value.to(value.dtype),
            grad_loc.contiguous().to(sampling_locations.dtype),
            grad_attn.contiguous().to(attention_weights.dtype))


# --------------------------------------------------------------------------
# Compiled path (thin wrappers, one place to intercept in tests)
# --------------------------------------------------------------------------
def _compiled_forward(value, spatial_shapes, level_start_index,
                      sampling_locations, attention_weights):
    return torch.ops.detr_plus_C.msda_forward(value, spatial_shapes,
                                              level_start_index,
                                              sampling_locations,
                                              attention_weights)


def _compiled_backward(grad_output, value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights):
    return torch.ops.detr_plus_C.msda_backward(grad_output, value,
                                               spatial_shapes,
                                               level_start_index,
                                               sampling_locations,
                                               attention_weights)


# --------------------------------------------------------------------------
# mmcv's CUDA kernel: the fallback on a GPU when ours is unusable
# --------------------------------------------------------------------------
def _mmcv_ext():
    """mmcv's compiled ops (``mmcv._ext``); raises when mmcv lacks them."""
    from mmcv.utils import ext_loader
    return ext_loader.load_ext(
        '_ext', ['ms_deform_attn_forward', 'ms_deform_attn_backward'])


def _mmcv_im2col_step(batch: int) -> int:
    """A step mmcv accepts (it must divide the batch), as large as allowed."""
    return batch if batch <= 64 else math.gcd(batch, 64)


def _alert_not_deterministic(what: str) -> None:
    """What aten's alertNotDeterministic does, for a Python-side kernel."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f'{what} does not have a deterministic implementation, but '
               'you set torch.use_deterministic_algorithms(True)')
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=3)
    else:
        raise RuntimeError(message)


def _mmcv_forward(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    """mmcv's CUDA forward in the compute dtype (float32 for 16-bit values,
    so bfloat16 works and float16 accumulates in float32 as ours does)."""
    ct = _compute_dtype(value.dtype)
    out = _mmcv_ext().ms_deform_attn_forward(
        value.to(ct).contiguous(), spatial_shapes.contiguous(),
        level_start_index.contiguous(),
        sampling_locations.to(ct).contiguous(),
        attention_weights.to(ct).contiguous(),
        _mmcv_im2col_step(value.shape[0]))
    return out.to(value.dtype)


def _mmcv_backward(grad_output, value, spatial_shapes, level_start_index,
                   sampling_locations, attention_weights):
    """mmcv's CUDA backward (atomics: not deterministic), compute dtype."""
    _alert_not_deterministic("mmcv's MSDeformAttn CUDA backward")
    ct = _compute_dtype(value.dtype)
    v, loc, attn = (
        t.to(ct).contiguous()
        for t in (value, sampling_locations, attention_weights))
    grads = [torch.zeros_like(t) for t in (v, loc, attn)]
    _mmcv_ext().ms_deform_attn_backward(v, spatial_shapes.contiguous(),
                                        level_start_index.contiguous(), loc,
                                        attn,
                                        grad_output.to(ct).contiguous(),
                                        *grads,
                                        _mmcv_im2col_step(value.shape[0]))
    return (grads[0].to(value.dtype), grads[1].to(sampling_locations.dtype),
            grads[2].to(attention_weights.dtype))


def _mmcv_problem(device: torch.device) -> Optional[str]:
    """None when mmcv's compiled kernel runs correctly on ``device``."""
    if device.type != 'cuda':
        return f'mmcv has no compiled MSDeformAttn kernel for {device.type}'

    def check():
        try:
            _mmcv_ext()
        except Exception as error:  # noqa: BLE001 - ImportError, ...
            return ('mmcv\'s compiled ops are unavailable '
                    f'({type(error).__name__}: {error})')
        return _selftest(device, _mmcv_forward)

    return _checked_once(('mmcv', device.type), check)


# --------------------------------------------------------------------------
# Implementation selection
# --------------------------------------------------------------------------
class force_pytorch:  # noqa: N801 - used like a function
    """Force (or stop forcing) the pure-PyTorch implementation.

    ``force_pytorch()`` / ``force_pytorch(True)`` switches it on globally,
    ``force_pytorch(False)`` back to the default; used as a context manager
    (``with force_pytorch(): ...``) the previous setting is restored on exit.
    Takes effect at the next call, also inside ``torch.compile``d code.
    """

    def __init__(self, enabled: bool = True):
        self._previous = _state['forced']
        _state['forced'] = 'pytorch' if enabled else None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        _state['forced'] = self._previous
        return False


def _requested_mode() -> str:
    if _state['forced'] is not None:
        return _state['forced']
    mode = os.environ.get(ENV_IMPL, 'auto').strip().lower() or 'auto'
    if mode not in ('auto', 'pytorch', 'compiled'):
        raise ValueError(f'{ENV_IMPL} must be auto, pytorch or compiled, '
                         f'got {mode!r}')
    return mode


def _selftest(device: torch.device, forward=None) -> Optional[str]:
    """Compare a compiled forward with the PyTorch path on a tiny input.

    ``forward`` defaults to ours (:func:`_compiled_forward`). Guards against
    a broken build that runs but computes garbage (e.g. zeros). Returns None
    when they agree, otherwise the problem.
    """
    forward = forward or _compiled_forward
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 5], [2, 2]])
    starts = torch.tensor([0, 15])
    value = torch.randn(1, 19, 2, 4, generator=gen)
    loc = torch.rand(1, 3, 2, 2, 2, 2, generator=gen) * 1.2 - 0.1
    attn = torch.rand(1, 3, 2, 2, 2, generator=gen)
    args = [t.to(device) for t in (value, shapes, starts, loc, attn)]
    try:
        got = forward(*args)
        want = multi_scale_deformable_attn_pytorch(args[0], args[1], args[3],
                                                   args[4])
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            return ('its self-test result differs from the PyTorch path '
                    f'(max abs diff {(got - want).abs().max().item():.3g})')
    except Exception as error:  # noqa: BLE001 - report any kernel failure
        return f'its self-test raised {type(error).__name__}: {error}'
    return None


def _compiled_problem(device: torch.device) -> Optional[str]:
    """None when the compiled kernel can run on ``device``, else why not."""
    if device.type not in ('cpu', 'cuda'):
        return f'there is no compiled kernel for {device.type} tensors'
    if load_ext() is None:
        return (f'the extension projects_detr_plus.ops._C failed to load '
                f'({ext_error()})')
    if device.type == 'cuda' and not ext_has_cuda():
        return 'the extension was built without CUDA'
    return _checked_once(device.type, lambda: _selftest(device))


def _checked_once(key, check):
    """``check()``'s result, computed once per key and kept (a kernel's
    self-test); the lock only for the first call."""
    if key not in _state['selftest']:
        with _lock:
            if key not in _state['selftest']:
                _state['selftest'][key] = check()
    return _state['selftest'][key]


def _warn_once(device: torch.device, problem: str, fallback: str) -> None:
    key = (device.type, problem, fallback)
    if key in _state['warned'] or device.type not in ('cpu', 'cuda'):
        return
    _state['warned'].add(key)
    warnings.warn(
        f'projects_detr_plus: the compiled MSDeformAttn kernel is not used '
        f'on {device.type} because {problem}; falling back to {fallback}. '
        'Build it with `pip install --no-build-isolation -e .` or `python '
        'setup.py build_ext --inplace`.',
        RuntimeWarning,
        stacklevel=3)


_FALLBACKS = {
    'mmcv':
    "mmcv's CUDA kernel (float32 accumulation; same results within "
    'float rounding)',
    'pytorch':
    'the pure-PyTorch implementation (same results, slower, more '
    'memory)',
}


def _fallback(device: torch.device) -> str:
    """'mmcv' on a GPU where mmcv's kernel works, else 'pytorch'."""
    if device.type == 'cuda' and _mmcv_problem(device) is None:
        return 'mmcv'
    return 'pytorch'


def _implementation(device: torch.device) -> str:
    """What the op runs on ``device``: 'compiled', 'mmcv' or 'pytorch'.

    Warns once (per device and problem) when it falls back.
    """
    mode = _requested_mode()
    if mode == 'pytorch':
        return 'pytorch'
    problem = _compiled_problem(device)
    if problem is None:
        return 'compiled'
    if mode == 'compiled':
        raise RuntimeError(f'{ENV_IMPL}=compiled but the compiled '
                           f'MSDeformAttn kernel is unusable: {problem}')
    fallback = _fallback(device)
    _warn_once(device, problem, _FALLBACKS[fallback])
    return fallback


def active_implementation(
        device: Union[str, torch.device, None] = None) -> str:
    """'compiled', 'mmcv' or 'pytorch': what the op would run on ``device``.

    ``device`` defaults to 'cuda' when CUDA is available, else 'cpu'.
    'mmcv' (mmcv's CUDA kernel) only stands in for ours on a GPU.
    """
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if _requested_mode() == 'pytorch':
        return 'pytorch'
    if _compiled_problem(device) is None:
        return 'compiled'
    return _fallback(device)


def implementation_info() -> Dict[str, object]:
    """Diagnostics: requested mode, extension status and per-device choice."""
    info = {
        'requested': _requested_mode(),
        'extension_loaded': load_ext() is not None,
        'extension_error': ext_error(),
        'extension_has_cuda': ext_has_cuda(),
        'cpu_isa': ext_cpu_isa(),
        'cpu': active_implementation('cpu'),
    }
    if torch.cuda.is_available():
        info['cuda'] = active_implementation('cuda')
    return info


# --------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------
def _forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Forward; loc/attn already in value's compute dtype, indices int64."""
    impl = _implementation(value.device)
    if impl == 'compiled':
        # The kernel validates index values itself on CPU; on CUDA they are
        # not read on the host (no sync), see _check_index_values.
        return _compiled_forward(value, spatial_shapes, level_start_index,
                                 sampling_locations, attention_weights)
    if impl == 'mmcv' and sampling_locations.numel() > 0:
        return _mmcv_forward(value, spatial_shapes, level_start_index,
                             sampling_locations, attention_weights)
    _check_index_values(spatial_shapes, level_start_index, value.shape[1])
    return _pytorch_forward(value, spatial_shapes, sampling_locations,
                            attention_weights)


def _backward_grads(
        grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, sampling_locations: Tensor,
        attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. value, sampling_locations and attention_weights."""
    impl = _implementation(value.device)
    if impl == 'compiled':
        return _compiled_backward(grad_output, value, spatial_shapes,
                                  level_start_index, sampling_locations,
                                  attention_weights)
    if impl == 'mmcv' and sampling_locations.numel() > 0:
        return _mmcv_backward(grad_output, value, spatial_shapes,
                              level_start_index, sampling_locations,
                              attention_weights)
    shapes = _check_index_values(spatial_shapes, level_start_index,
                                 value.shape[1])
    return _pytorch_backward(grad_output, value, shapes, sampling_locations,
                             attention_weights)


@torch.library.custom_op('detr_plus::ms_deform_attn', mutates_args=())
def _msda_op(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The op as torch.compile, torch.export and opcheck see it."""
    return _forward(value, spatial_shapes, level_start_index,
                    sampling_locations, attention_weights)


@_msda_op.register_fake
def _msda_op_fake(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights):
    bs, _, nh, dims = value.shape
    return value.new_empty(bs, sampling_locations.shape[1], nh * dims)


@torch.library.custom_op('detr_plus::ms_deform_attn_backward', mutates_args=())
def _msda_backward_op(
        grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
        level_start_index: Tensor, sampling_locations: Tensor,
        attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The backward as an op (for graphs that torch.compile differentiates)."""
    return _backward_grads(grad_output, value, spatial_shapes,
                           level_start_index, sampling_locations,
                           attention_weights)


@_msda_backward_op.register_fake
def _msda_backward_op_fake(grad_output, value, spatial_shapes,
                           level_start_index, sampling_locations,
                           attention_weights):
    return (value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, shapes, starts, loc, attn = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _msda_backward_op(
        grad_output, value, shapes, starts, loc, attn)
    return grad_value, None, None, grad_loc, grad_attn


torch.library.register_autograd(
    'detr_plus::ms_deform_attn', _backward, setup_context=_setup_context)


class _EagerMSDA(torch.autograd.Function):
    """The same op for plain eager calls, without the torch.library dispatch
    (which costs tens of microseconds of host time per call, enough to make
    small GPU calls launch-bound). Same implementations and results."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)
        return _forward(value, spatial_shapes, level_start_index,
                        sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = _backward_grads(
            grad_output, value, shapes, starts, loc, attn)
        return grad_value, None, None, grad_loc, grad_attn


def _plain_eager(*tensors: Tensor) -> bool:
    """True for plain tensors outside any tracing (torch.compile / export,
    jit.trace, make_fx, dispatch modes such as FLOP counters), where the
    custom op is what the tracer must see."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Tensor,
                                level_start_index: Tensor,
                                sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention (drop-in for mmcv's op).

    Args:
        value: (bs, num_keys, num_heads, head_dims), float16/bfloat16/32/64.
        spatial_shapes: (num_levels, 2) integer (H, W) per level; may live on
            the CPU for a CUDA value (then its values are validated without a
            device sync).
        level_start_index: (num_levels,) integer, first key of each level.
        sampling_locations: (bs, num_queries, num_heads, num_levels,
            num_points, 2) as (x, y), [0, 1] spans the map; outside points
            sample zeros. value's dtype, or float32 with a 16-bit value.
        attention_weights: (bs, num_queries, num_heads, num_levels,
            num_points), dtype rule as sampling_locations.

    Returns:
        (bs, num_queries, num_heads * head_dims) in value's dtype.

    Raises ValueError (naming the argument) for inconsistent shapes, dtypes or
    devices. Index values (sum(H*W) == num_keys, level_start_index) are
    checked whenever they are on the CPU or the PyTorch path runs; for CUDA
    index tensors on the compiled path they are not read (no sync).
    """
    _check_args(value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights)
    if (value.device.type != 'cpu' and spatial_shapes.device.type == 'cpu'
            and level_start_index.device.type == 'cpu'
            and not torch.compiler.is_compiling()):
        _check_index_values(spatial_shapes, level_start_index, value.shape[1])
    spatial_shapes = spatial_shapes.to(value.device, torch.long)
    level_start_index = level_start_index.to(value.device, torch.long)
    ct = _compute_dtype(value.dtype)
    args = (value, spatial_shapes, level_start_index,
            sampling_locations.to(ct), attention_weights.to(ct))
    if _plain_eager(*args):
        return _EagerMSDA.apply(*args)
    return _msda_op(*args)
