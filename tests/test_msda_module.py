"""``MultiScaleDeformableAttentionPlus`` against mmcv's module (CPU)."""
import pytest
import torch

mmcv_msda = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
pytest.importorskip('mmdet')

from mmdet.registry import MODELS  # noqa: E402

from projects_detr_plus.models.layers import \
    MultiScaleDeformableAttentionPlus  # noqa: E402

CFG = dict(embed_dims=64, num_heads=4, num_levels=3, num_points=3, dropout=0.0)
SHAPES = torch.tensor([[6, 5], [3, 3], [1, 2]])
STARTS = torch.tensor([0, 30, 39])
NUM_KEYS = 41


def make_pair(impl='ours', batch_first=False, **overrides):
    """mmcv's module and ours with identical (non-trivial) weights."""
    torch.manual_seed(0)
    cfg = dict(CFG, batch_first=batch_first, **overrides)
    ref = mmcv_msda.MultiScaleDeformableAttention(**cfg)
    with torch.no_grad():
        # the default init has zero attention logits and fixed offsets:
        # perturb so that every part of the computation matters
        for param in ref.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    ours = MultiScaleDeformableAttentionPlus(impl=impl, **cfg)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(batch_first, ref_dim, bs=2, num_query=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    embed = CFG['embed_dims']
    query = torch.randn(bs, num_query, embed, generator=gen)
    value = torch.randn(bs, NUM_KEYS, embed, generator=gen)
    if not batch_first:
        query, value = query.transpose(0, 1), value.transpose(0, 1)
    reference_points = torch.rand(
        bs, num_query, CFG['num_levels'], ref_dim, generator=gen)
    if ref_dim == 4:
        reference_points[..., 2:] *= 0.5
    mask = torch.zeros(bs, NUM_KEYS, dtype=torch.bool)
    mask[0, -5:] = True
    return dict(
        query=query,
        value=value,
        query_pos=torch.randn(query.shape, generator=gen),
        key_padding_mask=mask,
        reference_points=reference_points,
        spatial_shapes=SHAPES,
        level_start_index=STARTS)


def test_registered_without_collision():
    assert MODELS.get('MultiScaleDeformableAttentionPlus') is \
        MultiScaleDeformableAttentionPlus
    assert MODELS.get('MultiScaleDeformableAttention') is \
        mmcv_msda.MultiScaleDeformableAttention
    module = MODELS.build(
        dict(type='MultiScaleDeformableAttentionPlus', **CFG))
    assert module.impl == 'ours'


def test_same_parameters_and_init():
    torch.manual_seed(0)
    ref = mmcv_msda.MultiScaleDeformableAttention()
    torch.manual_seed(0)
    ours = MultiScaleDeformableAttentionPlus()
    assert list(ref.state_dict()) == list(ours.state_dict())
    for key, tensor in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], tensor)
    for name in ('embed_dims', 'num_heads', 'num_levels', 'num_points',
                 'im2col_step', 'batch_first'):
        assert getattr(ours, name) == getattr(ref, name)


def test_bad_impl():
    with pytest.raises(ValueError, match='impl'):
        MultiScaleDeformableAttentionPlus(impl='fast')


@pytest.mark.parametrize('impl', ['ours', 'pytorch', 'mmcv'])
@pytest.mark.parametrize('batch_first', [False, True])
@pytest.mark.parametrize('ref_dim', [2, 4])
def test_matches_mmcv_module(impl, batch_first, ref_dim):
    ref, ours = make_pair(impl, batch_first)
    inputs = make_inputs(batch_first, ref_dim)
    want = ref(**inputs)
    got = ours(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(
            param.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_identity_and_value_defaults():
    ref, ours = make_pair()
    inputs = make_inputs(False, 2, num_query=NUM_KEYS)
    inputs.pop('value')
    inputs['identity'] = torch.randn_like(inputs['query'])
    torch.testing.assert_close(
        ours(**inputs), ref(**inputs), rtol=1e-5, atol=1e-5)


def test_bad_reference_points():
    _, ours = make_pair()
    inputs = make_inputs(False, 2)
    inputs['reference_points'] = inputs['reference_points'][..., :1]
    with pytest.raises(ValueError, match='reference_points'):
        ours(**inputs)


def test_cpu_bf16_autocast():
    ref, ours = make_pair()
    inputs = make_inputs(True, 2)
    ref.batch_first = ours.batch_first = True
    want = ours(**inputs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = ours(**inputs)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
