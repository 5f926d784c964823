"""Query branches on two-stage Deformable DETR (H-Deformable-DETR)."""
import pytest
import torch

from detr_testing import (assert_empty_gt_losses, assert_same_predictions,
                          build, decode, deformable_detr_cfg, losses_with_seed,
                          make_batch, noised_branch, parameters_without_grad,
                          train_steps)

HYBRID = dict(type='HybridMatchingBranch', num_queries=40, k_one_to_many=3)


def h_deformable_detr(branches=(HYBRID, ), look_forward_twice=True, seed=0):
    torch.manual_seed(seed)
    model = build(
        deformable_detr_cfg(
            refine=True,
            two_stage=True,
            mixed_selection=True,
            look_forward_twice=look_forward_twice,
            branches=branches))
    model.train()
    return model


def test_perturbing_hybrid_queries_leaves_main_bit_identical():
    model = h_deformable_detr()
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    with noised_branch(model, 'hybrid'):
        noisy = decode(model, inputs, samples)
    main = slice(0, model.num_queries)
    hybrid = slice(model.num_queries, None)
    states, noisy_states = clean['hidden_states'], noisy['hidden_states']
    assert states.shape[2] == model.num_queries + HYBRID['num_queries']
    assert not torch.equal(states[:, :, hybrid], noisy_states[:, :, hybrid])
    assert torch.equal(states[:, :, main], noisy_states[:, :, main])
    for ref, noisy_ref in zip(clean['references'], noisy['references']):
        assert torch.equal(ref[:, main], noisy_ref[:, main])


def test_trained_model_predicts_like_plain_deformable_detr():
    model = h_deformable_detr()
    train_steps(model)
    plain = h_deformable_detr(branches=())
    missing, unexpected = plain.load_state_dict(
        model.state_dict(), strict=False)
    assert not missing
    assert unexpected == ['extra_branches.0.content.weight']
    assert_same_predictions(model, plain)


def test_hybrid_anchors_follow_the_class_agnostic_ranking():
    """Deformable DETR ranks proposals by class 0 (its encoder is trained
    class-agnostic): main = top N, hybrid = ranks N .. N + M."""
    model = h_deformable_detr()
    inputs, samples = make_batch()
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), True)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        enc_in, _ = model.pre_transformer(feats, data['data_samples'])
        enc_out = model.forward_encoder(**enc_in)
        context = model.query_context(**enc_out)
        decoder_in, _ = model.pre_decoder(
            **enc_out, batch_data_samples=data['data_samples'])
    n, m = model.num_queries, HYBRID['num_queries']
    order = context.enc_class[..., 0].argsort(dim=1, descending=True)
    expected = torch.gather(context.enc_coord_unact, 1,
                            order[:, :n + m, None].expand(-1, -1, 4))
    torch.testing.assert_close(decoder_in['reference_points'],
                               expected.sigmoid())
    # mixed selection: content from the learnable table, for both sets
    assert torch.equal(decoder_in['query'][0, :n],
                       model.query_embedding.weight)
    assert torch.equal(decoder_in['query'][0, n:],
                       model.extra_branches[0].content.weight)


def test_look_forward_twice_trains_the_previous_layer_refinement():
    """The box loss of layer 1 reaches layer 0's box head only with look
    forward twice; the forward values are the same either way."""
    grads, boxes = {}, {}
    for lft in (False, True):
        model = h_deformable_detr(branches=(), look_forward_twice=lft)
        outputs = decode(model, *make_batch())  # no grad: values only
        boxes[lft] = outputs['references']
        model.zero_grad(set_to_none=True)
        inputs, samples = make_batch()
        data = model.data_preprocessor(
            dict(inputs=inputs, data_samples=samples), True)
        feats = model.extract_feat(data['inputs'])
        out = model.forward_transformer(feats, data['data_samples'])
        _, layer_boxes = model.bbox_head(out['hidden_states'],
                                         out['references'])
        layer_boxes[1].sum().backward()  # layer 1's boxes
        grads[lft] = model.bbox_head.reg_branches[0][-1].weight.grad
    for ref_plain, ref_lft in zip(boxes[False], boxes[True]):
        assert torch.equal(ref_plain, ref_lft)
    assert grads[False] is None or not grads[False].any()
    assert grads[True] is not None and grads[True].abs().sum() > 0


def test_loss_keys_and_empty_ground_truth():
    model = h_deformable_detr()
    losses = losses_with_seed(model, *make_batch())
    for key in ('loss_cls', 'd0.loss_iou', 'enc_loss_cls', 'hybrid_loss_cls',
                'd0.hybrid_loss_bbox'):
        assert key in losses and losses[key] > 0, key
    assert not any(k.startswith('hybrid_enc') for k in losses)
    model.zero_grad(set_to_none=True)
    losses = losses_with_seed(model, *make_batch(num_gts=(0, 0)))
    assert_empty_gt_losses(losses)
    sum(losses.values()).backward()
    assert not parameters_without_grad(model)


def test_hybrid_content_initialised_like_main():
    model = h_deformable_detr()
    for table in (model.query_embedding.weight,
                  model.extra_branches[0].content.weight):
        assert abs(float(table.std()) - 1.0) < 0.15  # both N(0, 1)


def test_misconfigurations_are_named():
    with pytest.raises(ValueError, match='mixed_selection=True'):
        build(
            deformable_detr_cfg(
                refine=True, two_stage=True, branches=(HYBRID, )))
    with pytest.raises(ValueError, match='needs as_two_stage'):
        build(deformable_detr_cfg(refine=True, mixed_selection=True))
    with pytest.raises(ValueError, match='needs with_box_refine'):
        build(deformable_detr_cfg(look_forward_twice=True))
