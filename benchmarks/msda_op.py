#!/usr/bin/env python
"""Benchmark of the MSDeformAttn op: DETR+ (compiled), mmcv, plain PyTorch.

    python benchmarks/msda_op.py --device cpu \\
        --json benchmarks/results/msda_op_cpu.json
    python benchmarks/msda_op.py --device cuda --json out.json \\
        [--mmcv-src mmcv-2.1.0.tar.gz]
    python benchmarks/msda_op.py --device cpu --json /tmp/x.json --quick

Times forward (no_grad) and forward+backward (median over --repeats after
--warmup untimed runs) and the peak memory of one forward+backward:

* CPU: the growth of the peak RSS (VmHWM, reset through
  /proc/self/clear_refs) over the RSS with the inputs built, in a fresh
  subprocess per case and implementation;
* CUDA: torch.cuda.max_memory_allocated() above the memory in use before.

Implementations: ``ours`` (DETR+ op, compiled kernels), ``pytorch`` (DETR+
op forced onto its grid_sample path) and ``mmcv`` (on CPU mmcv's
``multi_scale_deformable_attn_pytorch``, which mmcv's module runs on CPU; on
CUDA mmcv's compiled kernel, from the installed mmcv or built from an mmcv
source tree / sdist given with --mmcv-src).

Shapes: DINO 4-scale encoder (num_queries = num_keys) and decoder (900
queries) at 512x512 (and 800x1333 on CUDA), batch 2, 8 heads x 32 dims,
4 levels x 4 points; float32 (``--dtypes``: also float16 / bfloat16, every
input in that dtype, as mmcv's op casts them). Sampling locations are
"realistic" (around each query's reference point, offsets of a few pixels as
a trained model makes) or "uniform" in [0, 1].

On CUDA the time of one call is the median over --repeats of a loop of
--inner calls timed with CUDA events, so the host's launch overhead overlaps
with the kernels as in training. Each case also reports the compulsory memory
traffic of one call (every input read once, every output written once) and
the floor it sets at the card's bandwidth (``BANDWIDTH_TBS``, and a
device-to-device copy measured in the same run).
"""
import argparse
import glob
import json
import math
import os
import os.path as osp
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from unittest import mock

import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from machine import cpu_model  # noqa: E402  benchmarks/machine.py
from projects_detr_plus import ops  # noqa: E402

IMPLS = ('ours', 'mmcv', 'pytorch')
STRIDES = (8, 16, 32, 64)
NUM_HEADS, HEAD_DIMS, NUM_POINTS = 8, 32, 4


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------
def level_shapes(height, width):
    """(H, W) of the 4 DINO levels (strides 8..64) of an image."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]


def case_specs(device, quick):
    """List of case dicts (JSON-serialisable)."""
    if quick:
        return [
            dict(
                name='quick-encoder-realistic',
                image=[64, 64],
                role='encoder',
                locations='realistic',
                batch=1,
                shapes=[[8, 8], [4, 4], [2, 2], [1, 1]])
        ]
    images = [(512, 512)] + ([(800, 1333)] if device == 'cuda' else [])
    specs = []
    for height, width in images:
        for role in ('encoder', 'decoder'):
            for locations in ('realistic', 'uniform'):
                specs.append(
                    dict(
                        name=f'{role}-{height}x{width}-{locations}',
                        image=[height, width],
                        role=role,
                        locations=locations,
                        batch=2,
                        shapes=[list(s) for s in level_shapes(height, width)]))
    return specs


def reference_points(spec, num_queries, gen):
    """(num_queries, 2) normalised (x, y) reference points."""
    if spec['role'] == 'decoder':
        return torch.rand(num_queries, 2, generator=gen)
    points = []
    for h, w in spec['shapes']:  # encoder: one query per pixel, its centre
        ys, xs = torch.meshgrid(
            (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
            indexing='ij')
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(points)


def make_inputs(spec, device, seed=0, dtype=torch.float32):
    """Op inputs (value, shapes, starts, loc, attn) for a case; the float
    tensors in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spec['shapes'], dtype=torch.long)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    num_keys, nl, bs = int(areas.sum()), len(spec['shapes']), spec['batch']
    nq = num_keys if spec['role'] == 'encoder' else 900
    value = torch.randn(bs, num_keys, NUM_HEADS, HEAD_DIMS, generator=gen)
    if spec['locations'] == 'uniform':
        loc = torch.rand(bs, nq, NUM_HEADS, nl, NUM_POINTS, 2, generator=gen)
    else:
        ref = reference_points(spec, nq, gen)[None, :, None, None, None]
        # like mmcv's init: head direction times (point + 1) pixels, plus
        # noise of a pixel; divided by each level's (W, H)
        theta = torch.arange(NUM_HEADS) * (2 * math.pi / NUM_HEADS)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True)[0]
        pixels = direction[:, None, None] * \
            torch.arange(1, NUM_POINTS + 1)[None, None, :, None]
        pixels = pixels + torch.randn(
            bs, nq, NUM_HEADS, nl, NUM_POINTS, 2, generator=gen)
        wh = shapes.flip(1).float()[None, None, None, :, None]
        loc = ref + pixels / wh
    logits = torch.randn(bs, nq, NUM_HEADS, nl * NUM_POINTS, generator=gen)
    attn = logits.softmax(-1).view(bs, nq, NUM_HEADS, nl, NUM_POINTS)
    spec.update(num_keys=num_keys, num_queries=nq)
    return [
        t.to(device, dtype if t.is_floating_point() else t.dtype)
        for t in (value, shapes, starts, loc, attn)
    ]


# --------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------
class _BuiltMmcvFunction(torch.autograd.Function):
    """mmcv's MultiScaleDeformableAttnFunction on an mmcv CUDA op built from
    source (same casts, zero-initialised grads, im2col_step)."""
    ext = None

    @staticmethod
    def forward(ctx, value, shapes, starts, loc, attn, im2col_step):
        loc, attn = loc.type_as(value), attn.type_as(value)
        ctx.im2col_step = im2col_step
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return _BuiltMmcvFunction.ext.ms_deform_attn_forward(
            value, shapes, starts, loc, attn, im2col_step)

    @staticmethod
    def backward(ctx, grad_output):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        grads = [torch.zeros_like(t) for t in (value, loc, attn)]
        _BuiltMmcvFunction.ext.ms_deform_attn_backward(
            value, shapes, starts, loc, attn, grad_output.contiguous(), *grads,
            ctx.im2col_step)
        return grads[0], None, None, grads[1], grads[2], None


# The two entry points with the names and argument order of mmcv._ext, so
# the built module can also stand in for mmcv._ext (tests/msda_cuda_suite.py).
BINDING = r'''
#include <torch/extension.h>
at::Tensor ms_deform_attn_cuda_forward(
    const at::Tensor &value, const at::Tensor &spatial_shapes,
    const at::Tensor &level_start_index, const at::Tensor &sampling_loc,
    const at::Tensor &attn_weight, const int im2col_step);
void ms_deform_attn_cuda_backward(
    const at::Tensor &value, const at::Tensor &spatial_shapes,
    const at::Tensor &level_start_index, const at::Tensor &sampling_loc,
    const at::Tensor &attn_weight, const at::Tensor &grad_output,
    at::Tensor &grad_value, at::Tensor &grad_sampling_loc,
    at::Tensor &grad_attn_weight, const int im2col_step);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ms_deform_attn_forward", &ms_deform_attn_cuda_forward);
  m.def("ms_deform_attn_backward", &ms_deform_attn_cuda_backward);
}
'''


def build_mmcv_cuda(src, build_dir=None):
    """Compile only mmcv's ms_deform_attn CUDA sources from an mmcv source
    tree or sdist (.tar.gz) with torch.utils.cpp_extension.load; returns
    the module. A ``build_dir`` used before is reused (ninja rebuilds
    nothing)."""
    from torch.utils.cpp_extension import load
    work = build_dir or tempfile.mkdtemp(prefix='mmcv_msda_')
    os.makedirs(work, exist_ok=True)
    if osp.isfile(src):
        tree = osp.join(work, 'src')
        if not osp.isdir(tree):
            with tarfile.open(src) as tar:
                tar.extractall(tree)
        src = tree
    found = glob.glob(
        osp.join(src, '**', 'ops', 'csrc', 'pytorch', 'cuda',
                 'ms_deform_attn_cuda.cu'),
        recursive=True)
    if not found:
        raise FileNotFoundError(f'no mmcv/ops/csrc in {src}')
    csrc = osp.dirname(osp.dirname(osp.dirname(found[0])))
    shim = osp.join(work, 'shim', 'THC')  # THC/ is gone from recent torch
    os.makedirs(shim, exist_ok=True)
    with open(osp.join(shim, 'THCAtomics.cuh'), 'w') as f:
        f.write('#pragma once\n#include <ATen/cuda/Atomic.cuh>\n')
    binding = osp.join(work, 'binding.cpp')
    with open(binding, 'w') as f:
        f.write(BINDING)
    return load(
        name='mmcv_msda_bench',
        sources=[binding, found[0]],
        extra_include_paths=[
            osp.join(csrc, 'common'),
            osp.join(csrc, 'common', 'cuda'),
            osp.dirname(shim)
        ],
        extra_cuda_cflags=['-O3', '-DMMCV_WITH_CUDA'],
        build_directory=work,
        verbose=False)


def mmcv_impl(device, mmcv_src, build_dir=None):
    """The mmcv op to compare with, or None (with a reason printed)."""
    if device == 'cpu':
        try:
            from mmcv.ops.multi_scale_deform_attn import \
                multi_scale_deformable_attn_pytorch as mmcv_pytorch
        except ImportError as error:
            print(f'mmcv unavailable: {error}')
            return None
        return lambda v, s, st, p, a: mmcv_pytorch(v, s, p, a)
    apply = None
    if mmcv_src:
        _BuiltMmcvFunction.ext = build_mmcv_cuda(mmcv_src, build_dir)
        apply = _BuiltMmcvFunction.apply
    else:
        try:
            from mmcv.ops.multi_scale_deform_attn import \
                MultiScaleDeformableAttnFunction
            apply = MultiScaleDeformableAttnFunction.apply
        except ImportError as error:
            print(f'mmcv unavailable ({error}); pass --mmcv-src')
            return None

    def mmcv_cuda(v, s, st, p, a):
        if v.dtype == torch.bfloat16:
            raise TypeError('mmcv 2.1.0 has no bfloat16 MSDeformAttn kernel '
                            '(AT_DISPATCH_FLOATING_TYPES_AND_HALF)')
        return apply(v, s, st, p, a, 64)

    return mmcv_cuda


def ours_impl(v, s, st, p, a):
    return ops.multi_scale_deformable_attn(v, s, st, p, a)


def pytorch_impl(v, s, st, p, a):
    with ops.force_pytorch():
        return ops.multi_scale_deformable_attn(v, s, st, p, a)


def get_impl(name, device, mmcv_src, build_dir=None):
    if name == 'ours':
        if ops.active_implementation(device) != 'compiled':
            print(f'ours: compiled kernel unavailable on {device} '
                  f'({ops.implementation_info()})')
            return None
        return ours_impl
    if name == 'pytorch':
        return pytorch_impl
    return mmcv_impl(device, mmcv_src, build_dir)


# --------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------
def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def fwd_bwd(fn, inputs, grad):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(grad)


def median_ms(run, device, warmup, repeats, inner=1):
    """Median time of one call: wall clock on the CPU; on CUDA, CUDA events
    around a loop of ``inner`` calls (launches overlap with the kernels)."""
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == 'cuda':
            start, end = (
                torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            for _ in range(inner):
                run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
            continue
        start = time.perf_counter()
        run()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def output_grad(inputs):
    value, loc = inputs[0], inputs[3]
    return torch.randn(
        value.shape[0],
        loc.shape[1],
        NUM_HEADS * HEAD_DIMS,
        device=value.device).to(value.dtype)


def time_impl(fn, inputs, device, warmup, repeats, inner=1):
    grad = output_grad(inputs)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    return dict(
        fwd_ms=median_ms(forward, device, warmup, repeats, inner),
        fwd_bwd_ms=median_ms(lambda: fwd_bwd(fn, inputs, grad), device, warmup,
                             repeats, inner))


def cuda_peak_mb(fn, inputs):
    grad = output_grad(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(fn, inputs, grad)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# Datasheet memory bandwidth (TB/s) of the cards the floor is quoted for.
BANDWIDTH_TBS = {'H100': 3.35, 'H200': 4.8}


def compulsory_mb(inputs):
    """Memory traffic (MB) one call cannot avoid: each input read once,
    each output written once. Backward: 'min' without and 'max' with
    grad_value's zero-initialisation (one more write of it)."""
    value, _, _, loc, attn = inputs
    out = value.shape[0] * loc.shape[1] * NUM_HEADS * HEAD_DIMS * \
        value.element_size()
    sizes = {
        name: t.numel() * t.element_size()
        for name, t in (('value', value), ('loc', loc), ('attn', attn))
    }
    fwd = sum(sizes.values()) + out
    bwd = out + 2 * sum(sizes.values())  # read grad_out + inputs, write grads
    return dict(
        fwd=fwd / 1e6, bwd_min=bwd / 1e6, bwd_max=(bwd + sizes['value']) / 1e6)


def copy_bandwidth_tbs(nbytes=2 * 2**30):
    """Device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, device='cuda')
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 'cuda', 3, 5, 5)  # noqa: F821
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e12


def bandwidth_floor(case, gpu_name, copy_tbs):
    """Floors (us) of forward / backward at the datasheet bandwidth and at
    the measured copy bandwidth, and how far each implementation is."""
    nominal = next((v for k, v in BANDWIDTH_TBS.items() if k in gpu_name),
                   None)
    mb = case['compulsory_mb']
    floors = {}
    for label, tbs in (('datasheet', nominal), ('measured_copy', copy_tbs)):
        if tbs:
            floors[label] = dict(
                tbs=tbs,
                fwd_us=mb['fwd'] / tbs,
                bwd_us=[mb['bwd_min'] / tbs, mb['bwd_max'] / tbs])
    case['floor'] = floors
    if 'datasheet' in floors:
        floor = floors['datasheet']
        case['x_floor'] = {
            name:
            dict(
                fwd=r['fwd_ms'] * 1e3 / floor['fwd_us'],
                fwd_bwd=r['fwd_bwd_ms'] * 1e3 /
                (floor['fwd_us'] + floor['bwd_us'][0]))
            for name, r in case['results'].items() if r and 'fwd_ms' in r
        }


def cpu_peak_mb(spec, impl, threads):
    """Peak RSS growth of one fwd+bwd, measured in a fresh subprocess."""
    cmd = [
        sys.executable,
        osp.abspath(__file__), '--device', 'cpu', '--threads',
        str(threads), '--_memory-child',
        json.dumps(dict(spec=spec, impl=impl))
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        print(f'memory child failed for {impl}: {proc.stderr[-2000:]}')
        return None
    print(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])['peak_mb']


def _proc_status_kib(field):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_baseline_kib():
    """Reset the peak-RSS mark to the current RSS; returns the RSS (KiB).

    ru_maxrss is useless here: a child starts with its parent's peak. On
    Linux, writing 5 to /proc/self/clear_refs resets VmHWM instead.
    """
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return _proc_status_kib('VmRSS')


def memory_child(arg):
    """Entry point of the CPU memory subprocess: prints {"peak_mb": x}."""
    job = json.loads(arg)
    spec, impl = job['spec'], job['impl']
    fn = get_impl(impl, 'cpu', None)
    # load kernels / run self-tests on a tiny case before the baseline
    tiny = make_inputs(
        dict(spec, shapes=[[2, 2]], role='decoder', batch=1), 'cpu')
    fwd_bwd(fn, tiny, torch.ones(1, 900, NUM_HEADS * HEAD_DIMS))
    inputs = make_inputs(
        spec, 'cpu', dtype=DTYPES[spec.get('dtype', 'float32')])
    grad = output_grad(inputs)
    try:
        base = _rss_baseline_kib()
        fwd_bwd(fn, inputs, grad)
        peak = _proc_status_kib('VmHWM')
    except (OSError, KeyError):  # no procfs: ru_maxrss (may be inflated)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fwd_bwd(fn, inputs, grad)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f'rss base {base} KiB, peak {peak} KiB', file=sys.stderr)
    print(json.dumps(dict(peak_mb=(peak - base) / 1024)))


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def add_ratios(case):
    res = case['results']
    mmcv = res.get('mmcv')
    case['speedup_vs_mmcv'], case['memory_ratio_vs_mmcv'] = {}, {}
    if not mmcv:
        return
    if 'fwd_ms' not in mmcv:
        return
    for name, r in res.items():
        if not r or name == 'mmcv' or 'fwd_ms' not in r:
            continue
        case['speedup_vs_mmcv'][name] = {
            k: mmcv[f'{k}_ms'] / r[f'{k}_ms']
            for k in ('fwd', 'fwd_bwd')
        }
        if r.get('peak_mb') and mmcv.get('peak_mb'):
            case['memory_ratio_vs_mmcv'][name] = \
                r['peak_mb'] / mmcv['peak_mb']


def print_table(cases):
    head = (f'{"case":40s} {"impl":8s} {"fwd ms":>9s} {"f+b ms":>9s} '
            f'{"peak MB":>9s} {"x mmcv f":>9s} {"x mmcv fb":>9s} '
            f'{"mem/mmcv":>9s}')
    print(head)
    print('-' * len(head))

    def fmt(x, spec='9.2f'):
        return format(x, spec) if x is not None else f'{"-":>9s}'

    for case in cases:
        for name, r in case['results'].items():
            if not r or 'fwd_ms' not in r:
                why = (r or {}).get('error', 'unavailable')
                print(f'{case["name"]:40s} {name:8s} {why[:60]}')
                continue
            sp = case['speedup_vs_mmcv'].get(name, {})
            print(f'{case["name"]:40s} {name:8s} {fmt(r["fwd_ms"])} '
                  f'{fmt(r["fwd_bwd_ms"])} {fmt(r.get("peak_mb"), "9.1f")} '
                  f'{fmt(sp.get("fwd"))} {fmt(sp.get("fwd_bwd"))} '
                  f'{fmt(case["memory_ratio_vs_mmcv"].get(name), "9.3f")}')


DTYPES = {
    'float32': torch.float32,
    'float16': torch.float16,
    'bfloat16': torch.bfloat16
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument(
        '--json',
        help='write the results here (rewritten '
        'after every case)')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='one tiny shape, run once (smoke test)')
    parser.add_argument('--repeats', type=int, default=None)
    parser.add_argument('--warmup', type=int, default=None)
    parser.add_argument(
        '--inner', type=int, default=20, help='CUDA: calls per timed loop')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch CPU threads (default: torch default)')
    parser.add_argument('--impls', default=','.join(IMPLS))
    parser.add_argument(
        '--dtypes',
        default=None,
        help='comma-separated of float32,float16,bfloat16 '
        '(default: float32 on CPU, all three on CUDA)')
    parser.add_argument(
        '--ab-bwd-lanes',
        default='',
        help='CUDA: also time ours with these values of '
        'DETR_PLUS_MSDA_CUDA_BWD_MIN_LANES (comma-separated;'
        ' 1 = widest vectors), as ours-bwd-lanesN')
    parser.add_argument('--no-memory', action='store_true')
    parser.add_argument(
        '--cases',
        default='',
        help='comma-separated substrings: only matching '
        'case names')
    parser.add_argument(
        '--mmcv-src',
        help='mmcv source tree or sdist to '
        'build mmcv\'s CUDA op from when mmcv is missing')
    parser.add_argument(
        '--mmcv-build-dir',
        help='where to build it (reused '
        'when built there before)')
    parser.add_argument(
        '--build-mmcv-only',
        action='store_true',
        help='build mmcv\'s op from --mmcv-src and exit')
    parser.add_argument(
        '--_memory-child', dest='memory_child', help=argparse.SUPPRESS)
    return parser, parser.parse_args()


def with_env(fn, **env):
    """``fn`` to be timed with these environment variables set (read by the
    kernels at each call)."""

    def wrapped(*args):
        return fn(*args)

    wrapped.env = env
    return wrapped


def run_case(spec, dtype, impls, args, repeats, warmup):
    """Times (and memory) of every implementation on one case and dtype."""
    inputs = make_inputs(spec, args.device, dtype=DTYPES[dtype])
    results = {}
    for name, fn in impls.items():
        if fn is None:
            results[name] = None
            continue
        with mock.patch.dict(os.environ, getattr(fn, 'env', {})):
            results[name] = time_and_memory(name, fn, spec, dtype, inputs,
                                            args, repeats, warmup)
    case = dict(
        spec,
        name=f'{spec["name"]}-{dtype}',
        dtype=dtype,
        num_heads=NUM_HEADS,
        head_dims=HEAD_DIMS,
        num_levels=len(spec['shapes']),
        num_points=NUM_POINTS,
        compulsory_mb=compulsory_mb(inputs),
        results=results)
    add_ratios(case)
    return case


def time_and_memory(name, fn, spec, dtype, inputs, args, repeats, warmup):
    """Timings (and peak memory) of one implementation, or its error."""
    try:
        r = time_impl(fn, inputs, args.device, warmup, repeats,
                      args.inner if args.device == 'cuda' else 1)
    except (TypeError, RuntimeError) as error:
        print(f'{spec["name"]} {dtype} {name}: {error}', flush=True)
        return dict(error=f'{type(error).__name__}: {error}')
    if not args.no_memory:
        r['peak_mb'] = cuda_peak_mb(fn, inputs) \
            if args.device == 'cuda' else \
            cpu_peak_mb(dict(spec, dtype=dtype), name,
                        torch.get_num_threads())
    print(f'{spec["name"]} {dtype} {name}: {r}', flush=True)
    return r


def main():
    parser, args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.build_mmcv_only:
        if not args.mmcv_src:
            parser.error('--build-mmcv-only needs --mmcv-src')
        print(build_mmcv_cuda(args.mmcv_src, args.mmcv_build_dir).__file__)
        return 0
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('CUDA is not available')
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else \
        (3 if args.device == 'cuda' else 1)
    dtypes = (
        args.dtypes or
        ('float32,float16,bfloat16' if args.device == 'cuda' else 'float32'))
    dtypes = dtypes.split(',')
    unknown = set(dtypes) - set(DTYPES)
    if unknown:
        parser.error(f'unknown dtypes {sorted(unknown)}')
    impls = {
        name: get_impl(name, args.device, args.mmcv_src, args.mmcv_build_dir)
        for name in args.impls.split(',')
    }
    for lanes in filter(None, args.ab_bwd_lanes.split(',')):
        if args.device != 'cuda' or impls.get('ours') is None:
            parser.error('--ab-bwd-lanes needs --device cuda and ours')
        impls[f'ours-bwd-lanes{lanes}'] = with_env(
            ours_impl, DETR_PLUS_MSDA_CUDA_BWD_MIN_LANES=lanes)
    gpu = torch.cuda.get_device_name() if args.device == 'cuda' else None
    copy_tbs = copy_bandwidth_tbs() if args.device == 'cuda' else None
    report = dict(
        device=args.device,
        torch=torch.__version__,
        cpu=cpu_model(),
        gpu=gpu,
        threads=torch.get_num_threads(),
        quick=args.quick,
        repeats=repeats,
        warmup=warmup,
        inner=args.inner if args.device == 'cuda' else 1,
        python=platform.python_version(),
        implementation=ops.implementation_info(),
        copy_bandwidth_tbs=copy_tbs,
        timing='median over repeats; CPU: wall time of one call; CUDA: CUDA '
        'events around `inner` back-to-back calls, divided by inner. fwd '
        'under no_grad, fwd_bwd = forward with grad + backward',
        memory='CPU: peak RSS (VmHWM) growth during one fwd+bwd in a fresh '
        'subprocess; CUDA: max_memory_allocated above the baseline',
        floor='compulsory traffic (each input read once, each output '
        'written once; backward max adds the zeroing of grad_value) over '
        'the datasheet bandwidth; x_floor = time / floor (fwd_bwd: over '
        'the forward floor plus the backward minimum)',
        date=time.strftime('%Y-%m-%d %H:%M:%S'),
        cases=[])
    wanted = [c for c in args.cases.split(',') if c]
    for spec in case_specs(args.device, args.quick):
        if wanted and not any(c in spec['name'] for c in wanted):
            continue
        for dtype in dtypes:
            case = run_case(dict(spec), dtype, impls, args, repeats, warmup)
            if gpu:
                bandwidth_floor(case, gpu, copy_tbs)
            report['cases'].append(case)
            if args.json:
                write_json(report, args.json)
    print_table(report['cases'])
    if args.json:
        print(f'wrote {args.json}')
    return 0


def write_json(report, path):
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(report, f, indent=2)


if __name__ == '__main__':
    sys.exit(main())
