"""Tests of the MSDeformAttn op ``projects_detr_plus.ops`` (CPU, torch only).

The compiled-kernel tests skip when the extension is not built, unless
``DETR_PLUS_REQUIRE_EXT=1`` (CI), where they fail instead. Comparisons with
mmcv's ``multi_scale_deformable_attn_pytorch`` skip when mmcv is missing.
"""
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import projects_detr_plus.ops as ops
from projects_detr_plus.ops import _ext, msda

OP = torch.ops.detr_plus.ms_deform_attn.default


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def require_ext():
    """Skip (or fail with DETR_PLUS_REQUIRE_EXT=1) without the extension."""
    if _ext.load_ext() is None:
        reason = ('compiled extension projects_detr_plus.ops._C not built '
                  f'({_ext.ext_error()}); build with `python setup.py '
                  'build_ext --inplace`')
        if os.environ.get('DETR_PLUS_REQUIRE_EXT') == '1':
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def compiled():
    require_ext()
    assert ops.active_implementation('cpu') == 'compiled'


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """No forced mode / env override leaks between tests."""
    monkeypatch.delenv(msda.ENV_IMPL, raising=False)
    previous = msda._state['forced']
    msda._state['forced'] = None
    yield
    msda._state['forced'] = previous


def make_inputs(shapes,
                bs=2,
                nq=5,
                nh=2,
                dims=4,
                npts=2,
                dtype=torch.float64,
                seed=0,
                spread=(-0.15, 1.15)):
    """Random op inputs; locations in ``spread`` (outside [0, 1] too)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long).view(-1, 2)
    areas = spatial_shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    nl, nk = len(shapes), int(areas.sum())
    value = torch.randn(bs, nk, nh, dims, generator=gen, dtype=dtype)
    lo, hi = spread
    loc = torch.rand(bs, nq, nh, nl, npts, 2, generator=gen, dtype=dtype)
    loc = loc * (hi - lo) + lo
    attn = torch.rand(bs, nq, nh, nl, npts, generator=gen, dtype=dtype)
    return value, spatial_shapes, starts, loc, attn


def run(fn, value, shapes, starts, loc, attn, seed=1):
    """Output and (grad_value, grad_loc, grad_attn) for a random grad."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return (out.detach(), ) + tuple(grads)


def ours(value, shapes, starts, loc, attn):
    return ops.multi_scale_deformable_attn(value, shapes, starts, loc, attn)


def reference(value, shapes, starts, loc, attn):
    return ops.multi_scale_deformable_attn_pytorch(value, shapes, loc, attn)


def mmcv_reference(value, shapes, starts, loc, attn):
    mmcv_msda = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    return mmcv_msda.multi_scale_deformable_attn_pytorch(
        value, shapes, loc, attn)


def assert_all_close(got, want, dtype):
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else \
        dict(rtol=1e-4, atol=1e-4)
    names = ('output', 'grad_value', 'grad_sampling_locations',
             'grad_attention_weights')
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f'{name}: {m}')


SHAPE_CASES = [
    # (spatial shapes, nh, dims, npts)
    ([(1, 1)], 1, 3, 1),
    ([(5, 7)], 2, 17, 3),
    ([(4, 4), (2, 2)], 8, 32, 4),
    ([(7, 3), (3, 5), (1, 1)], 3, 30, 2),
    ([(6, 6), (3, 3), (2, 2), (1, 1)], 2, 8, 8),
    ([(9, 2), (1, 7), (3, 3), (2, 5), (1, 1)], 4, 64, 5),
    ([(3, 4), (2, 2)], 1, 1, 1),
    ([(2, 3)], 2, 16, 4),
]


# --------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shapes,nh,dims,npts', SHAPE_CASES)
def test_compiled_matches_pytorch_path(compiled, shapes, nh, dims, npts,
                                       dtype):
    args = make_inputs(
        shapes, bs=3, nq=7, nh=nh, dims=dims, npts=npts, dtype=dtype)
    got = run(ours, *args)
    with ops.force_pytorch():
        forced = run(ours, *args)
    assert_all_close(got, run(reference, *args), dtype)
    assert_all_close(forced, run(reference, *args), dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shapes,nh,dims,npts', SHAPE_CASES)
@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
def test_matches_mmcv(shapes, nh, dims, npts, dtype, impl):
    pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    args = make_inputs(
        shapes, bs=2, nq=6, nh=nh, dims=dims, npts=npts, dtype=dtype, seed=3)
    with ops.force_pytorch(impl == 'pytorch'):
        got = run(ours, *args)
    assert_all_close(got, run(mmcv_reference, *args), dtype)


def test_far_outside_and_edges(compiled):
    """Points far away, exactly on borders and at -1/W pixel edges."""
    value, shapes, starts, _, attn = make_inputs([(4, 6), (3, 2)],
                                                 nq=8,
                                                 npts=3)
    # (not exactly at x == -1 or x == W, where the gradient jumps and
    # rounding decides the side)
    edges = torch.tensor(
        [-1e6, -0.5, -0.07, 0.0, 1 / 12, 0.5, 1.0, 1.07, 1.25, 1e6],
        dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(len(edges), (2, 8, 2, 2, 3, 2), generator=gen)
    loc = edges[idx]
    want = run(reference, value, shapes, starts, loc, attn)
    got = run(ours, value, shapes, starts, loc, attn)
    assert_all_close(got, want, torch.float64)


def test_realistic_dino_like_shape(compiled):
    """A scaled-down encoder shape in float32."""
    args = make_inputs([(16, 16), (8, 8), (4, 4), (2, 2)],
                       bs=2,
                       nq=340,
                       nh=8,
                       dims=32,
                       npts=4,
                       dtype=torch.float32,
                       seed=7)
    assert_all_close(run(ours, *args), run(reference, *args), torch.float32)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_against_pytorch_path(compiled, data):
    nl = data.draw(st.integers(1, 4), label='levels')
    shapes = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6)))
              for _ in range(nl)]
    args = make_inputs(
        shapes,
        bs=data.draw(st.integers(1, 3), label='bs'),
        nq=data.draw(st.integers(0, 9), label='nq'),
        nh=data.draw(st.integers(1, 4), label='heads'),
        dims=data.draw(
            st.sampled_from([1, 2, 3, 5, 8, 16, 17, 32]), label='dims'),
        npts=data.draw(st.integers(1, 5), label='points'),
        seed=data.draw(st.integers(0, 2**16), label='seed'))
    assert_all_close(run(ours, *args), run(reference, *args), torch.float64)


# --------------------------------------------------------------------------
# autograd / torch.library integration
# --------------------------------------------------------------------------
@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
def test_gradcheck_fp64(impl):
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2), (1, 1)],
                                                   bs=2,
                                                   nq=3,
                                                   nh=2,
                                                   dims=3,
                                                   npts=2,
                                                   spread=(0.02, 0.98))
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    with ops.force_pytorch(impl == 'pytorch'):
        assert torch.autograd.gradcheck(
            lambda v, p, a: ours(v, shapes, starts, p, a),
            leaves,
            eps=1e-6,
            atol=1e-6)


def opcheck_args():
    value, shapes, starts, loc, attn = make_inputs([(3, 4), (2, 2)],
                                                   bs=2,
                                                   nq=3,
                                                   nh=2,
                                                   dims=4,
                                                   npts=2,
                                                   dtype=torch.float32)
    return (value.requires_grad_(), shapes, starts, loc.requires_grad_(),
            attn.requires_grad_())


@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
def test_opcheck(impl):
    with ops.force_pytorch(impl == 'pytorch'):
        torch.library.opcheck(OP, opcheck_args())
        value, shapes, starts, loc, attn = (t.detach() for t in opcheck_args())
        grad = torch.randn(2, 3, 8)
        torch.library.opcheck(
            torch.ops.detr_plus.ms_deform_attn_backward.default,
            (grad, value, shapes, starts, loc, attn))


def test_torch_compile_fullgraph():
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)],
                                                   bs=2,
                                                   nq=6,
                                                   nh=2,
                                                   dims=8,
                                                   npts=2,
                                                   dtype=torch.float32)

    def fn(v, p, a):
        return (ours(v, shapes, starts, p, a) * 2).sum()

    compiled_fn = torch.compile(fn, fullgraph=True, backend='aot_eager')
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    want = torch.autograd.grad(fn(*leaves), leaves)
    got = torch.autograd.grad(compiled_fn(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.slow
def test_torch_compile_inductor():
    value, shapes, starts, loc, attn = make_inputs([(4, 5), (2, 3)],
                                                   bs=2,
                                                   nq=6,
                                                   nh=2,
                                                   dims=8,
                                                   npts=2,
                                                   dtype=torch.float32)

    def fn(v, p, a):
        return ours(v.relu(), shapes, starts, p, a).sum(-1)

    compiled_fn = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(
        compiled_fn(value, loc, attn), fn(value, loc, attn))


def test_torch_export():

    class Attend(torch.nn.Module):

        def forward(self, value, shapes, starts, loc, attn):
            return ours(value, shapes, starts, loc, attn)

    args = make_inputs([(4, 5), (2, 3)],
                       bs=2,
                       nq=6,
                       nh=2,
                       dims=8,
                       dtype=torch.float32)
    exported = torch.export.export(Attend(), args)
    assert 'detr_plus.ms_deform_attn' in str(exported.graph)
    torch.testing.assert_close(exported.module()(*args), Attend()(*args))


# --------------------------------------------------------------------------
# layouts, dtypes, sizes
# --------------------------------------------------------------------------
def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = make_inputs([(3, 5), (2, 2)],
                                                   nq=6,
                                                   nh=3,
                                                   dims=5)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.permute(5, 0, 1, 2, 3,
                         4).contiguous().permute(1, 2, 3, 4, 5, 0)
    attn_nc = attn.flip(0).contiguous().flip(0)[::1]
    shapes_nc = shapes.t().contiguous().t()
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous()
    want = run(reference, value, shapes, starts, loc, attn)
    got = run(ours, value_nc, shapes_nc, starts, loc_nc, attn_nc)
    assert_all_close(got, want, torch.float64)


@pytest.mark.parametrize('bs,nq', [(2, 0), (0, 4), (0, 0)])
@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
def test_empty_sizes(bs, nq, impl):
    args = make_inputs([(3, 2), (1, 1)], bs=bs, nq=nq)
    with ops.force_pytorch(impl == 'pytorch'):
        out, gv, gl, ga = run(ours, *args)
    assert out.shape == (bs, nq, 8)
    assert gv.shape == args[0].shape and not gv.any()
    assert gl.shape == args[3].shape and ga.shape == args[4].shape


def test_int32_index_tensors():
    value, shapes, starts, loc, attn = make_inputs([(3, 2), (2, 2)])
    torch.testing.assert_close(
        ours(value, shapes.int(), starts.int(), loc, attn),
        ours(value, shapes, starts, loc, attn))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_16bit_value_on_cpu(dtype):
    """16-bit values run in float32 and return the value's dtype."""
    value, shapes, starts, loc, attn = make_inputs([(4, 4), (2, 2)],
                                                   nq=6,
                                                   dims=8,
                                                   dtype=torch.float32)
    want = ours(value.to(dtype).float(), shapes, starts, loc, attn)
    for loc_attn_dtype in (torch.float32, dtype):
        out, gv, gl, ga = run(ours, value.to(dtype), shapes, starts,
                              loc.to(loc_attn_dtype), attn.to(loc_attn_dtype))
        assert out.dtype == gv.dtype == dtype
        assert gl.dtype == ga.dtype == loc_attn_dtype
        tol = 1e-2 if loc_attn_dtype == torch.float32 else 5e-2
        torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


def test_cpu_bf16_autocast():
    """A module-like pipeline under CPU bf16 autocast: no crash, close."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)
    value_in, shapes, starts, loc, attn = make_inputs([(4, 4), (2, 2)],
                                                      nq=6,
                                                      nh=2,
                                                      dims=8,
                                                      npts=2,
                                                      dtype=torch.float32)
    x = torch.randn(2, 20, 16)

    def pipeline():
        value = proj(x).view(2, 20, 2, 8)
        weights = attn.view(2, 6, 2, 4).softmax(-1).view_as(attn)
        return ours(value, shapes, starts, loc, weights)

    want = pipeline()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = pipeline()
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
    got.float().sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.isfinite().all()


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def _bad(name):
    value, shapes, starts, loc, attn = make_inputs([(3, 2), (2, 2)], nq=4)
    args = dict(
        value=value,
        spatial_shapes=shapes,
        level_start_index=starts,
        sampling_locations=loc,
        attention_weights=attn)
    if name == 'keys':
        args['value'] = value[:, :-1]
    elif name == 'last_dim':
        args['sampling_locations'] = loc[..., :1]
    elif name == 'value_ndim':
        args['value'] = value.flatten(2)
    elif name == 'loc_ndim':
        args['sampling_locations'] = loc[:, :, :, :, 0]
    elif name == 'attn_shape':
        args['attention_weights'] = attn[..., :1]
    elif name == 'heads':
        args['sampling_locations'] = loc[:, :, :1]
        args['attention_weights'] = attn[:, :, :1]
    elif name == 'levels':
        args['spatial_shapes'] = shapes[:1]
    elif name == 'batch':
        args['sampling_locations'] = loc[:1]
        args['attention_weights'] = attn[:1]
    elif name == 'dtype':
        args['sampling_locations'] = loc.float()
    elif name == 'attn_dtype':
        args['attention_weights'] = attn.float()
    elif name == 'shapes_dtype':
        args['spatial_shapes'] = shapes.double()
    elif name == 'shapes_cols':
        args['spatial_shapes'] = shapes[:, :1]
    elif name == 'start_index':
        args['level_start_index'] = starts + 1
    elif name == 'start_len':
        args['level_start_index'] = starts[:1]
    elif name == 'negative':
        args['spatial_shapes'] = torch.tensor([[3, 2], [-2, -2]])
        args['level_start_index'] = torch.tensor([0, 6])
    elif name == 'device':
        args['attention_weights'] = attn.to('meta')
    return args


ERROR_CASES = {
    'keys': 'num_keys',
    'last_dim': 'sampling_locations',
    'value_ndim': 'value',
    'loc_ndim': 'sampling_locations',
    'attn_shape': 'attention_weights',
    'heads': 'sampling_locations',
    'levels': 'level_start_index|sampling_locations',
    'batch': 'sampling_locations',
    'dtype': 'sampling_locations',
    'attn_dtype': 'attention_weights',
    'shapes_dtype': 'spatial_shapes',
    'shapes_cols': 'spatial_shapes',
    'start_index': 'level_start_index',
    'start_len': 'level_start_index',
    'negative': 'spatial_shapes',
    'device': 'attention_weights',
}


@pytest.mark.parametrize('impl', ['auto', 'pytorch'])
@pytest.mark.parametrize('case', sorted(ERROR_CASES))
def test_bad_inputs_raise(case, impl):
    with ops.force_pytorch(impl == 'pytorch'):
        with pytest.raises(ValueError, match=ERROR_CASES[case]):
            ops.multi_scale_deformable_attn(**_bad(case))


def test_kernel_checks_values_itself(compiled):
    """The raw kernel rejects inconsistent index values too."""
    args = _bad('keys')
    with pytest.raises(ValueError, match='num_keys'):
        torch.ops.detr_plus_C.msda_forward(*args.values())


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv(msda.ENV_IMPL, 'fast')
    with pytest.raises(ValueError, match=msda.ENV_IMPL):
        ops.multi_scale_deformable_attn(**_bad('none'))


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)
    torch.set_num_threads(threads)


def test_deterministic_backward_bitwise(compiled, deterministic):
    """Many queries hit the same keys; grad bits repeat run to run and
    across thread counts (each grad_value element has one owner)."""
    args = make_inputs([(8, 8), (4, 4), (2, 2)],
                       bs=2,
                       nq=400,
                       nh=4,
                       dims=32,
                       npts=4,
                       dtype=torch.float32,
                       spread=(0.3, 0.6))
    results = []
    for threads in (2, 2, 1):
        torch.set_num_threads(threads)
        results.append(run(ours, *args))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------
# implementation selection and fallback
# --------------------------------------------------------------------------
@pytest.fixture
def fresh_selection():
    """Forget the self-test results and warnings; restore afterwards."""
    saved = {
        k: (set(v) if isinstance(v, set) else dict(v))
        for k, v in msda._state.items() if k in ('warned', 'selftest')
    }
    msda._state['warned'].clear()
    msda._state['selftest'].clear()
    yield
    msda._state['warned'] = saved['warned']
    msda._state['selftest'] = saved['selftest']


def test_force_pytorch_and_env(compiled, monkeypatch):
    args = make_inputs([(3, 2), (2, 2)], nq=4)
    want = ours(*args)
    assert ops.active_implementation('cpu') == 'compiled'
    with ops.force_pytorch():
        assert ops.active_implementation('cpu') == 'pytorch'
        torch.testing.assert_close(ours(*args), want)
    assert ops.active_implementation('cpu') == 'compiled'
    ops.force_pytorch(True)
    assert ops.active_implementation() == 'pytorch'
    ops.force_pytorch(False)
    assert ops.active_implementation('cpu') == 'compiled'
    monkeypatch.setenv(msda.ENV_IMPL, 'pytorch')
    assert ops.active_implementation('cpu') == 'pytorch'
    assert ops.implementation_info()['cpu'] == 'pytorch'
    torch.testing.assert_close(ours(*args), want)


def test_missing_extension_falls_back_with_one_warning(monkeypatch,
                                                       fresh_selection):
    monkeypatch.setitem(_ext._state, 'loaded', True)
    monkeypatch.setitem(_ext._state, 'module', None)
    monkeypatch.setitem(_ext._state, 'error',
                        'ImportError: simulated missing _C')
    args = make_inputs([(3, 2), (2, 2)], nq=4)
    with pytest.warns(RuntimeWarning, match='simulated missing _C'):
        out = run(ours, *args)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = run(ours, *args)
    assert ops.active_implementation('cpu') == 'pytorch'
    assert_all_close(out, run(reference, *args), torch.float64)
    assert_all_close(again, out, torch.float64)
    monkeypatch.setenv(msda.ENV_IMPL, 'compiled')
    with pytest.raises(RuntimeError, match='simulated missing _C'):
        ours(*args)


def test_broken_extension_is_detected(compiled, monkeypatch, fresh_selection):
    """A kernel returning zeros fails the self-test: warn, use PyTorch."""
    monkeypatch.setattr(
        msda, '_compiled_forward', lambda value, *a: value.new_zeros(
            value.shape[0], a[2].shape[1], value.shape[2] * value.shape[3]))
    args = make_inputs([(3, 2), (2, 2)], nq=4)
    with pytest.warns(RuntimeWarning, match='self-test'):
        out = ours(*args)
    torch.testing.assert_close(out, reference(*args))
    assert out.abs().sum() > 0


def test_extension_loads_when_required():
    if os.environ.get('DETR_PLUS_REQUIRE_EXT') != '1':
        pytest.skip('DETR_PLUS_REQUIRE_EXT is not set')
    assert _ext.load_ext() is not None, _ext.ext_error()
    assert ops.active_implementation('cpu') == 'compiled'


# --------------------------------------------------------------------------
# mmcv's CUDA kernel as the GPU fallback, faked on the CPU
# --------------------------------------------------------------------------
class FakeMmcvExt:
    """mmcv._ext's MSDeformAttn entry points with mmcv's contract (same dtype
    everywhere, contiguous, int64 indices, batch divisible by im2col_step,
    grads written in place), computed by the PyTorch path. Records calls."""

    def __init__(self):
        self.calls = []

    def _check(self, tensors, shapes, starts, im2col_step):
        assert len({t.dtype for t in tensors}) == 1, 'mixed dtypes'
        assert tensors[0].dtype in (torch.float32, torch.float64, torch.half)
        assert all(t.is_contiguous() for t in tensors + [shapes, starts])
        assert shapes.dtype == starts.dtype == torch.int64
        batch = tensors[0].shape[0]
        assert batch % min(batch, im2col_step) == 0

    def ms_deform_attn_forward(self, value, shapes, starts, loc, attn,
                               im2col_step):
        self._check([value, loc, attn], shapes, starts, im2col_step)
        self.calls.append(('forward', value.dtype, im2col_step))
        return msda.multi_scale_deformable_attn_pytorch(
            value, shapes, loc, attn)

    def ms_deform_attn_backward(self, value, shapes, starts, loc, attn,
                                grad_output, grad_value, grad_loc, grad_attn,
                                im2col_step):
        self._check(
            [value, loc, attn, grad_output, grad_value, grad_loc, grad_attn],
            shapes, starts, im2col_step)
        self.calls.append(('backward', value.dtype, im2col_step))
        with msda.force_pytorch():
            grads = msda._pytorch_backward(grad_output, value,
                                           [tuple(s) for s in shapes.tolist()],
                                           loc, attn)
        for out, grad in zip((grad_value, grad_loc, grad_attn), grads):
            out += grad


@pytest.fixture
def fake_mmcv(monkeypatch):
    ext = FakeMmcvExt()
    monkeypatch.setattr(msda, '_mmcv_ext', lambda: ext)
    return ext


@pytest.mark.parametrize('batch,step', [(1, 1), (3, 3), (64, 64), (96, 32),
                                        (130, 2)])
def test_mmcv_im2col_step_divides_the_batch(batch, step):
    assert msda._mmcv_im2col_step(batch) == step


@pytest.mark.parametrize(
    'dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_mmcv_wrappers_match_reference(fake_mmcv, dtype):
    """16-bit values go to mmcv in float32 (bf16 works, fp16 accumulates in
    float32); results come back in the caller's dtypes."""
    value, shapes, starts, loc, attn = make_inputs([(4, 3), (2, 2)],
                                                   bs=3,
                                                   nq=4,
                                                   dims=8)
    value = value.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)
    loc32, attn32 = loc.float(), attn.float()
    if dtype == torch.float64:
        loc32, attn32 = loc, attn
    out = msda._mmcv_forward(value, shapes, starts, loc32, attn32)
    ct = msda._compute_dtype(dtype)
    want = reference(value.to(ct), shapes, starts, loc32.to(ct), attn32.to(ct))
    assert out.dtype == dtype
    torch.testing.assert_close(out.to(ct), want.to(dtype).to(ct))
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    gv, gl, ga = msda._mmcv_backward(grad, value, shapes, starts, loc32,
                                     attn32)
    assert (gv.dtype, gl.dtype, ga.dtype) == (dtype, loc32.dtype, attn32.dtype)
    wants = msda._pytorch_backward(grad, value, [(4, 3), (2, 2)], loc32,
                                   attn32)
    for got, wanted in zip((gv, gl, ga), wants):
        torch.testing.assert_close(got, wanted)
    assert fake_mmcv.calls == [('forward', ct, 3), ('backward', ct, 3)]


def test_mmcv_backward_alerts_in_deterministic_mode(fake_mmcv):
    args = make_inputs([(3, 3)], bs=2)
    grad = torch.ones(2, 5, 8, dtype=torch.float64)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match='deterministic'):
            msda._mmcv_backward(grad, *args)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match='deterministic'):
            msda._mmcv_backward(grad, *args)
    finally:
        torch.use_deterministic_algorithms(False)


def test_op_falls_back_to_mmcv_with_one_warning(fake_mmcv, monkeypatch,
                                                fresh_selection):
    """Our kernel unusable where mmcv's works (faked for the CPU device):
    the op runs mmcv's kernel, forward and backward, after one warning."""
    monkeypatch.setattr(msda, '_compiled_problem',
                        lambda device: 'simulated broken kernel')
    monkeypatch.setattr(msda, '_fallback', lambda device: 'mmcv')
    args = make_inputs([(5, 4), (2, 3)], bs=2, nq=6, nh=2, dims=4)
    with pytest.warns(
            RuntimeWarning,
            match=r"simulated broken kernel.*"
            r"falling back to mmcv's CUDA kernel"):
        got = run(ours, *args)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        run(ours, *args)
    assert [c[0] for c in fake_mmcv.calls] == ['forward', 'backward'] * 2
    assert_all_close(got, run(reference, *args), torch.float64)
    assert ops.active_implementation('cpu') == 'mmcv'


def test_mmcv_fallback_needs_a_working_mmcv_kernel(monkeypatch,
                                                   fresh_selection):
    cuda = torch.device('cuda')
    assert 'no compiled' in msda._mmcv_problem(torch.device('cpu'))

    def missing():
        raise ImportError('simulated mmcv without _ext')

    monkeypatch.setattr(msda, '_mmcv_ext', missing)
    assert 'simulated mmcv without _ext' in msda._mmcv_problem(cuda)
    assert msda._fallback(cuda) == 'pytorch'
    # a kernel that computes garbage fails the self-test
    ext = FakeMmcvExt()
    ext.ms_deform_attn_forward = lambda value, shapes, starts, loc, attn, \
        step: value.new_zeros(value.shape[0], loc.shape[1],
                              value.shape[2] * value.shape[3])
    monkeypatch.setattr(msda, '_mmcv_ext', lambda: ext)
    assert 'self-test' in msda._selftest(
        torch.device('cpu'), msda._mmcv_forward)
    assert msda._selftest(torch.device('cpu'), msda._mmcv_forward) is not None
    monkeypatch.setattr(msda, '_mmcv_ext', lambda: FakeMmcvExt())
    assert msda._selftest(torch.device('cpu'), msda._mmcv_forward) is None
    # the selection: mmcv when our kernel fails on a GPU and mmcv's works
    msda._state['selftest'][('mmcv', 'cuda')] = None
    monkeypatch.setattr(msda, '_compiled_problem',
                        lambda device: 'simulated: built without CUDA')
    with pytest.warns(RuntimeWarning, match="built without CUDA.*mmcv's"):
        assert msda._implementation(cuda) == 'mmcv'
    assert ops.active_implementation(cuda) == 'mmcv'
    msda._state['selftest'][('mmcv', 'cuda')] = 'simulated mmcv failure'
    with pytest.warns(RuntimeWarning, match='pure-PyTorch'):
        assert msda._implementation(cuda) == 'pytorch'


def test_eager_calls_skip_the_library_dispatch(compiled):
    """Plain eager calls run the autograd.Function fast path; tracers
    (make_fx, torch.compile, torch.export) still see the custom op; both
    give the same values and gradients."""
    from torch.fx.experimental.proxy_tensor import make_fx
    args = make_inputs([(4, 3), (2, 2)], nq=6)
    value = args[0].clone().requires_grad_()
    out = ours(value, *args[1:])
    assert type(out.grad_fn).__name__ == '_EagerMSDABackward'

    def through_library(value, shapes, starts, loc, attn):
        return OP(value, shapes, starts, loc, attn)

    assert_all_close(
        run(ours, *args), run(through_library, *args), torch.float64)
    graph = make_fx(ours)(*args).graph
    assert OP in [node.target for node in graph.nodes]
