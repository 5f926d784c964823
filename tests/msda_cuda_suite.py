"""CUDA checks of the MSDeformAttn op, for a GPU machine with torch alone.

    python tests/msda_cuda_suite.py   # runs every check, prints a summary
    python -m pytest tests/msda_cuda_suite.py

Not collected by the default test run (no ``test_`` file prefix): CI machines
have no GPU. Every check skips without CUDA; without the compiled CUDA kernel
they fail when ``DETR_PLUS_REQUIRE_EXT=1`` and skip otherwise.

The fallback to mmcv's CUDA kernel is checked for real with mmcv's op, from
the installed mmcv or, on a machine without mmcv, built from its sdist
(``DETR_PLUS_MMCV_SRC=mmcv-2.1.0.tar.gz``, built in
``DETR_PLUS_MMCV_BUILD``, see ``tools/gpu_check.sh``).
"""
import os
import os.path as osp
import sys
import traceback

import pytest
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from projects_detr_plus import ops  # noqa: E402
from projects_detr_plus.ops import _ext  # noqa: E402

DEV = 'cuda'


def need_cuda_kernel():
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    if ops.active_implementation('cuda') != 'compiled':
        reason = ('compiled CUDA kernel unavailable: '
                  f'{ops.implementation_info()}')
        if os.environ.get('DETR_PLUS_REQUIRE_EXT') == '1':
            pytest.fail(reason)
        pytest.skip(reason)


def make_inputs(shapes,
                bs=2,
                nq=9,
                nh=4,
                dims=32,
                npts=4,
                dtype=torch.float32,
                device=DEV,
                seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    nl, nk = len(shapes), int(areas.sum())
    value = torch.randn(bs, nk, nh, dims, generator=gen, dtype=torch.float64)
    loc = torch.rand(
        bs, nq, nh, nl, npts, 2, generator=gen,
        dtype=torch.float64) * 1.3 - 0.15
    attn = torch.rand(bs, nq, nh, nl, npts, generator=gen, dtype=torch.float64)
    return (value.to(device, dtype), spatial_shapes.to(device),
            starts.to(device), loc.to(device, dtype), attn.to(device, dtype))


def run(value, shapes, starts, loc, attn, seed=1, grad_dtype=None):
    """Output and the three grads for a random output grad, drawn in
    float32 and rounded to ``grad_dtype`` (default: the output's)."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ops.multi_scale_deformable_attn(leaves[0], shapes, starts, leaves[1],
                                          leaves[2])
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen)
    grad = grad.to(grad_dtype or out.dtype).to(out)
    return (out.detach(), ) + torch.autograd.grad(out, leaves, grad)


def cpu_fp64_reference(args):
    """The same inputs on the CPU in float64 (compiled CPU or PyTorch), with
    the output grad rounded as ``run`` rounds it for ``args``."""
    return run(
        *(t.detach().cpu().double() if t.is_floating_point() else t.cpu()
          for t in args),
        grad_dtype=args[0].dtype)


def compare(got, want, rtol, atol):
    names = ('output', 'grad_value', 'grad_loc', 'grad_attn')
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(
            g.double().cpu(),
            w.double().cpu(),
            rtol=rtol,
            atol=atol,
            msg=lambda m: f'{name}: {m}')


CASES = [
    ([(1, 1)], 1, 3, 1),
    ([(5, 7)], 2, 17, 3),
    ([(16, 16), (8, 8), (4, 4), (2, 2)], 8, 32, 4),
    ([(7, 3), (3, 5), (1, 1)], 3, 30, 2),
    ([(9, 2), (1, 7), (3, 3), (2, 5), (1, 1)], 4, 64, 8),
    ([(6, 6)], 1, 256, 2),
    ([(4, 4), (2, 2)], 2, 8, 4),
]


@pytest.mark.parametrize('shapes,nh,dims,npts', CASES)
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_parity_fp32_fp64(shapes, nh, dims, npts, dtype):
    need_cuda_kernel()
    args = make_inputs(shapes, nh=nh, dims=dims, npts=npts, dtype=dtype)
    tol = (1e-9, 1e-10) if dtype == torch.float64 else (1e-4, 1e-4)
    compare(run(*args), cpu_fp64_reference(args), *tol)
    with ops.force_pytorch():
        compare(run(*args), cpu_fp64_reference(args), *tol)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('loc_dtype', ['same', 'float32'])
def test_16bit(dtype, loc_dtype):
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(16, 16), (8, 8), (4, 4),
                                                    (2, 2)],
                                                   nh=8,
                                                   dims=32,
                                                   dtype=torch.float32)
    lt = dtype if loc_dtype == 'same' else torch.float32
    args = (value.to(dtype), shapes, starts, loc.to(lt), attn.to(lt))
    got = run(*args)
    assert got[0].dtype == got[1].dtype == dtype
    assert got[2].dtype == got[3].dtype == lt
    # reference: the same (rounded) inputs in float64
    compare(
        got,
        cpu_fp64_reference(args),
        rtol=2e-2,
        atol=2e-2 if dtype == torch.float16 else 8e-2)


def test_autocast_fp16():
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(8, 8), (4, 4)],
                                                   nh=2,
                                                   dims=16)
    proj = torch.nn.Linear(32, 32).to(DEV)
    x = value.reshape(2, -1, 32)
    with torch.autocast('cuda', dtype=torch.float16):
        v = proj(x).view(value.shape)
        out = ops.multi_scale_deformable_attn(v, shapes, starts, loc, attn)
    assert out.dtype == torch.float16
    want = ops.multi_scale_deformable_attn(
        proj(x).view(value.shape), shapes, starts, loc, attn)
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()


def test_gradcheck_fp64():
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)],
                                                   bs=2,
                                                   nq=3,
                                                   nh=2,
                                                   dims=3,
                                                   npts=2,
                                                   dtype=torch.float64)
    loc = loc.clamp(0.02, 0.98)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    assert torch.autograd.gradcheck(
        lambda v, p, a: ops.multi_scale_deformable_attn(
            v, shapes, starts, p, a),
        leaves,
        eps=1e-6,
        atol=1e-6)


def test_opcheck_compile_export():
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)],
                                                   nh=2,
                                                   dims=8,
                                                   npts=2)
    torch.library.opcheck(torch.ops.detr_plus.ms_deform_attn.default,
                          (value.requires_grad_(), shapes, starts,
                           loc.requires_grad_(), attn.requires_grad_()))

    def fn(v, p, a):
        return ops.multi_scale_deformable_attn(v, shapes, starts, p, a)

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(
        compiled(value, loc, attn), fn(value, loc, attn))

    class M(torch.nn.Module):

        def forward(self, v, s, st, p, a):
            return ops.multi_scale_deformable_attn(v, s, st, p, a)

    args = tuple(t.detach() for t in (value, shapes, starts, loc, attn))
    exported = torch.export.export(M(), args)
    torch.testing.assert_close(exported.module()(*args), M()(*args))


def test_non_contiguous_and_empty():
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(5, 4), (2, 2)],
                                                   nh=3,
                                                   dims=6)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.permute(5, 0, 1, 2, 3,
                         4).contiguous().permute(1, 2, 3, 4, 5, 0)
    compare(
        run(value_nc, shapes, starts, loc_nc, attn),
        run(value, shapes, starts, loc, attn), 1e-6, 1e-6)
    for bs, nq in ((2, 0), (0, 3)):
        args = make_inputs([(3, 2)], bs=bs, nq=nq)
        out, gv, gl, ga = run(*args)
        assert out.shape == (bs, nq, 128) and not gv.any()


def test_cpu_index_tensors_are_validated():
    need_cuda_kernel()
    value, shapes, starts, loc, attn = make_inputs([(3, 2), (2, 2)])
    with pytest.raises(ValueError, match='num_keys'):
        ops.multi_scale_deformable_attn(value[:, :-1], shapes.cpu(),
                                        starts.cpu(), loc, attn)
    with pytest.raises(ValueError, match='sampling_locations'):
        ops.multi_scale_deformable_attn(value, shapes, starts, loc.cpu(), attn)


def test_other_device():
    """Inputs on a GPU that is not the current one (device guard)."""
    need_cuda_kernel()
    if torch.cuda.device_count() < 2:
        pytest.skip('needs 2 GPUs')
    args = make_inputs([(6, 5), (3, 3)], device='cuda:1')
    with torch.cuda.device(0):
        got = run(*args)
    compare(got, cpu_fp64_reference(args), 1e-4, 1e-4)


def test_deterministic_mode_raises():
    need_cuda_kernel()
    args = make_inputs([(4, 4)])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match='deterministic'):
            run(*args)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_large_batch_no_divisibility_rule():
    need_cuda_kernel()
    args = make_inputs([(8, 8), (4, 4)], bs=67, nq=5, nh=2, dims=16)
    compare(run(*args), cpu_fp64_reference(args), 1e-4, 1e-4)


def test_dino_encoder_size_matches_pytorch_path():
    """DINO's encoder at 800x1333, batch 2 (22223 queries): fp32 kernel
    against the PyTorch path on the GPU, and bf16 against fp32."""
    need_cuda_kernel()
    from benchmarks.msda_op import level_shapes
    from benchmarks.msda_op import make_inputs as bench_inputs
    spec = dict(
        role='encoder',
        locations='realistic',
        batch=2,
        shapes=[list(x) for x in level_shapes(800, 1333)])
    args = bench_inputs(spec, DEV)
    got = run(*args)
    with ops.force_pytorch():
        want = run(*args)
    compare(got, want, rtol=1e-3, atol=1e-3)
    value, shapes, starts, loc, attn = args
    half = run(value.bfloat16(), shapes, starts, loc, attn)  # AMP's dtypes
    torch.testing.assert_close(half[0].float(), want[0], rtol=0.02, atol=0.02)


def mmcv_ext_module():
    """mmcv._ext, or mmcv's MSDeformAttn CUDA op built from its sdist."""
    try:
        from mmcv.utils import ext_loader
        return ext_loader.load_ext(
            '_ext', ['ms_deform_attn_forward', 'ms_deform_attn_backward'])
    except ImportError:
        pass
    src = os.environ.get('DETR_PLUS_MMCV_SRC')
    if not src:
        pytest.skip('no mmcv: set DETR_PLUS_MMCV_SRC=mmcv-2.1.0.tar.gz')
    from benchmarks.msda_op import build_mmcv_cuda
    return build_mmcv_cuda(src, os.environ.get('DETR_PLUS_MMCV_BUILD'))


@pytest.mark.parametrize('dtype',
                         [torch.float64, torch.float32, torch.bfloat16])
def test_fallback_to_mmcv_kernel(dtype):
    """Our kernel made unusable: the op warns once and runs mmcv's CUDA
    kernel (float32 for 16-bit values), with the reference's results."""
    from projects_detr_plus.ops import msda
    if not torch.cuda.is_available():
        pytest.skip('no CUDA device')
    ext = mmcv_ext_module()
    saved = (msda._mmcv_ext, msda._compiled_problem,
             set(msda._state['warned']), dict(msda._state['selftest']))
    msda._mmcv_ext = lambda: ext
    msda._compiled_problem = lambda device: 'simulated: kernel unusable'
    msda._state['warned'].clear()
    msda._state['selftest'].clear()
    try:
        assert ops.active_implementation('cuda') == 'mmcv'
        # 16-bit values with float32 locations, as under AMP: mmcv drops a
        # point at exactly x or y = -1 (a strict test), which locations
        # rounded to 16 bits hit; grid_sample keeps its gradient there.
        value, shapes, starts, loc, attn = make_inputs(
            [(16, 16), (8, 8), (4, 4), (2, 2)],
            bs=3,
            nh=8,
            dims=32,
            dtype=torch.float32 if dtype == torch.bfloat16 else dtype)
        args = (value.to(dtype), shapes, starts, loc, attn)
        with pytest.warns(RuntimeWarning, match="mmcv's CUDA kernel"):
            got = run(*args)
        want = cpu_fp64_reference(args)
        tol = {
            torch.float64: (1e-9, 1e-10),
            torch.float32: (1e-4, 1e-4),
            torch.bfloat16: (2e-2, 8e-2)
        }[dtype]
        compare(got, want, *tol)
        assert got[0].dtype == dtype
    finally:
        msda._mmcv_ext, msda._compiled_problem = saved[:2]
        msda._state['warned'], msda._state['selftest'] = saved[2:]


def main():
    tests = [(name, fn) for name, fn in sorted(globals().items())
             if name.startswith('test_') and callable(fn)]
    failed = 0
    for name, fn in tests:
        params = getattr(fn, 'pytestmark', [])
        grids = [[{}]]
        for mark in params:
            if mark.name == 'parametrize':
                keys = [k.strip() for k in mark.args[0].split(',')]
                values = [v if len(keys) > 1 else (v, ) for v in mark.args[1]]
                grids.append([dict(zip(keys, v)) for v in values])
        combos = [{}]
        for grid in grids:
            combos = [dict(c, **g) for c in combos for g in grid]
        for kwargs in combos:
            label = f'{name}{kwargs or ""}'
            try:
                fn(**kwargs)
                print(f'PASS {label}')
            except pytest.skip.Exception as skip:
                print(f'SKIP {label}: {skip}')
            except BaseException:  # noqa: BLE001 - report and go on
                failed += 1
                print(f'FAIL {label}\n{traceback.format_exc()}')
    print(f'{failed} failed; extension: {_ext.ext_error() or "loaded"}; '
          f'info: {ops.implementation_info()}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
