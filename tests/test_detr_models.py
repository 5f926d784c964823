"""Our Deformable DETR and DINO: mmdet parity, branches, empty GT, DDP."""

import pytest
import torch

from detr_testing import (build, deformable_detr_cfg, dino_cfg,
                          losses_with_seed, make_batch, predict)

VARIANTS = {
    'deformable-detr':
    lambda plus: deformable_detr_cfg(plus),
    'deformable-detr-refine':
    lambda plus: deformable_detr_cfg(plus, refine=True),
    'deformable-detr-refine-twostage':
    lambda plus: deformable_detr_cfg(plus, refine=True, two_stage=True),
    'dino':
    lambda plus: dino_cfg(plus),
}


def _rel_close(ours, ref, rtol=1e-4, atol=1e-6):
    return torch.allclose(ours, ref, rtol=rtol, atol=atol)


@pytest.fixture(scope='module', params=sorted(VARIANTS))
def pair(request):
    """(name, mmdet model, our model holding the same weights)."""
    torch.manual_seed(0)
    reference = build(VARIANTS[request.param](False))
    ours = build(VARIANTS[request.param](True))
    ours.load_state_dict(reference.state_dict(), strict=True)
    return request.param, reference, ours


def test_same_parameters_and_keys(pair):
    _, reference, ours = pair
    ref_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in reference.parameters())


def test_predictions_equal_mmdet(pair):
    _, reference, ours = pair
    inputs, samples = make_batch()
    ref_results = predict(reference, inputs, samples)
    our_results = predict(ours, inputs, samples)
    for ref, res in zip(ref_results, our_results):
        assert _rel_close(res.pred_instances.scores, ref.pred_instances.scores)
        assert _rel_close(
            res.pred_instances.bboxes, ref.pred_instances.bboxes, atol=1e-4)
        assert torch.equal(res.pred_instances.labels,
                           ref.pred_instances.labels)


def test_losses_equal_mmdet(pair):
    _, reference, ours = pair
    inputs, samples = make_batch()
    reference.train()
    ours.train()
    ref_losses = losses_with_seed(reference, inputs, samples)
    our_losses = losses_with_seed(ours, inputs, samples)
    assert sorted(our_losses) == sorted(ref_losses)
    for key, value in ref_losses.items():
        assert _rel_close(our_losses[key], value), key


def test_mmdet_checkpoint_file_loads(pair, tmp_path):
    from mmengine.runner import load_checkpoint
    name, reference, _ = pair
    path = tmp_path / 'mmdet.pth'
    torch.save(
        dict(
            state_dict=reference.state_dict(),
            meta=dict(mmdet_version='3.3.0')), path)
    fresh = build(VARIANTS[name](True))
    load_checkpoint(fresh, str(path), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize('where,model_cfg', [
    ('encoder', lambda: dino_cfg(dims=128)),
    ('decoder', lambda: dino_cfg(dims=128)),
    ('decoder', lambda: deformable_detr_cfg(refine=True, two_stage=True)),
])
def test_activation_checkpointing_same_losses_and_gradients(
        monkeypatch, where, model_cfg):
    """``num_cp`` (official Co-DETR's ``with_cp``) in the encoder or the
    decoder: same losses and gradients, the layers really checkpointed."""
    from projects_detr_plus.models.layers import transformer
    calls = []
    original = transformer.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, 'checkpoint', counting)
    grads, losses = [], []
    for num_cp in (0, 1):
        cfg = model_cfg()
        cfg[where]['num_cp'] = num_cp
        torch.manual_seed(0)
        model = build(cfg)
        model.train()
        loss = losses_with_seed(model, *make_batch())
        sum(loss.values()).backward()
        losses.append(loss)
        grads.append({
            k: p.grad.clone()
            for k, p in model.named_parameters() if p.grad is not None
        })
    assert len(calls) == 1  # the num_cp=1 model's first layer
    for key, value in losses[0].items():
        torch.testing.assert_close(losses[1][key], value)
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(
            grads[1][key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_ffn_relu_is_out_of_place_with_the_same_values():
    """Our encoder / decoder layers build mmcv's FFN with its ReLU out of
    place (``layers.transformer.build_ffn``: no ``CopySlices`` copy of the
    whole gradient in the backward); values and gradients are those of the
    in-place FFN with the same weights."""
    from mmcv.cnn.bricks.transformer import FFN
    from torch.autograd.graph import Node

    from projects_detr_plus.models.layers.transformer import build_ffn
    cfg = dict(embed_dims=16, feedforward_channels=32, ffn_drop=0.0)
    ours = build_ffn(cfg)
    mmcv_ffn = FFN(**cfg)
    mmcv_ffn.load_state_dict(ours.state_dict())
    assert not any(getattr(m, 'inplace', False) for m in ours.modules())
    x = torch.randn(2, 7, 16, requires_grad=True)
    outs, grads, nodes = [], [], []
    for ffn in (ours, mmcv_ffn):
        y = ffn(x)
        seen, stack = set(), [y.grad_fn]
        while stack:  # every autograd node of the graph
            node = stack.pop()
            if isinstance(node, Node) and node not in seen:
                seen.add(node)
                stack.extend(n for n, _ in node.next_functions)
        nodes.append({type(n).__name__ for n in seen})
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), x)[0])
    assert 'CopySlices' in nodes[1] and 'CopySlices' not in nodes[0]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
