"""DDQ-DETR: mmdet parity, distinct-query masks, the dense branch."""
import copy

import pytest
import torch

from detr_testing import (assert_empty_gt_losses, build, ddq_cfg, decode,
                          losses_with_seed, make_batch, noised_branch,
                          parameters_without_grad, predict)
from projects_detr_plus.models.branches import (MAIN, QuerySet,
                                                concat_query_sets)
from projects_detr_plus.models.layers.attention_layout import \
    block_self_attention
from projects_detr_plus.models.layers.distinct_queries import \
    DistinctQuerySelection
from projects_detr_plus.models.losses import matched_set_loss
from projects_detr_plus.ops.nms import distinct_indices

NMS = dict(type='nms', iou_threshold=0.8)


def _overlapping_boxes(model):
    """Large, overlapping predicted boxes, so that NMS suppresses queries
    (a freshly initialised model predicts small disjoint anchors)."""
    torch.manual_seed(1)
    head = model.bbox_head
    with torch.no_grad():
        for reg in list(head.reg_branches) + list(head.aux_reg_branches):
            reg[-1].weight.normal_(std=0.05)
            reg[-1].bias.normal_()
            reg[-1].bias[2:] = 3.0
    return model


def ddq(plus=True, **kwargs):
    torch.manual_seed(0)
    return _overlapping_boxes(build(ddq_cfg(plus, **kwargs)))


@pytest.fixture(scope='module')
def pair():
    """(mmdet's DDQDETR, ours with its mask, holding the same weights)."""
    reference = ddq(False)
    ours = ddq(True, suppressed='mmdet')
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def test_same_parameters_and_keys(pair):
    reference, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == \
        sum(p.numel() for p in reference.parameters())


def test_queries_are_suppressed_in_these_tests(pair):
    _, ours = pair
    inputs, samples = make_batch()
    isolated = copy.deepcopy(ours)
    isolated.suppressed_queries = 'isolated'
    keep = decode(isolated, inputs, samples, training=False)['query_keep']
    assert 0 < keep[-1].sum() < keep[-1].numel()
    # mmdet reads its distinct set from row 0 of its mask: all queries
    # whenever query 0 is distinct, as here
    keep = decode(ours, inputs, samples, training=False)['query_keep']
    assert keep[-1].all()


def test_predictions_equal_mmdet(pair):
    reference, ours = pair
    inputs, samples = make_batch()
    for ref, res in zip(
            predict(reference, inputs, samples),
            predict(ours, inputs, samples)):
        ref, res = ref.pred_instances, res.pred_instances
        assert len(res) == len(ref)
        assert torch.allclose(res.scores, ref.scores, rtol=1e-4, atol=1e-6)
        assert torch.allclose(res.bboxes, ref.bboxes, rtol=1e-4, atol=1e-4)
        assert torch.equal(res.labels, ref.labels)


def _mmdet_key(key):
    """Our loss key -> mmdet DDQ's (dense losses are per image there)."""
    layer, _, name = key.rpartition('.')
    if name.startswith('dense_enc_'):
        return 'aux_enc_aux_' + name[len('dense_enc_'):].replace('iou', 'bbox')
    if name.startswith('dense_'):
        index = int(layer[1:]) if layer else 1  # 2 decoder layers
        return f'{index}_aux_aux_' + name[len('dense_'):].replace(
            'iou', 'bbox')
    return key


def test_losses_equal_mmdet(pair):
    reference, ours = pair
    inputs, samples = make_batch()
    reference.train()
    ours.train()
    ref_losses = losses_with_seed(reference, inputs, samples)
    our_losses = losses_with_seed(ours, inputs, samples)
    assert sorted(map(_mmdet_key, our_losses)) == sorted(ref_losses)
    for key, value in our_losses.items():
        expected = ref_losses[_mmdet_key(key)]
        if isinstance(expected, list):
            expected = sum(expected)
        assert torch.allclose(value, expected, rtol=1e-4, atol=1e-6), key


def test_mmdet_checkpoint_file_loads(pair, tmp_path):
    from mmengine.runner import load_checkpoint
    reference, ours = pair
    reference.train()
    losses_with_seed(reference, *make_batch())
    # after a training step mmdet's model holds the dense box predictors
    # twice (``decoder.aux_reg_branches`` too), and so do its checkpoints
    assert any(
        k.startswith('decoder.aux_reg_branches.')
        for k in reference.state_dict())
    path = tmp_path / 'ddq.pth'
    torch.save(dict(state_dict=reference.state_dict()), path)
    fresh = build(ddq_cfg(True))
    load_checkpoint(fresh, str(path), strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), key


def test_distinct_indices_is_per_image_nms():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.5], [50, 50, 60, 60],
                          [0, 0, 10, 7]]).float()
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.6, 0.7, 0.8]])
    kept = distinct_indices(boxes.expand(2, 4, 4), scores, NMS)
    assert kept[0].tolist() == [0, 2, 3]  # 1 overlaps 0 (IoU 0.95)
    assert kept[1].tolist() == [3, 2, 1]  # by score; 0 overlaps 1
    only = torch.tensor([[False, True, True, True], [True] * 4])
    assert distinct_indices(boxes.expand(2, 4, 4), scores, NMS,
                            only)[0].tolist() == [1, 2, 3]


def _selection_case(suppressed, num_dn=4, n=6, dims=16):
    """A main block of n main + num_dn denoising queries: its layout after a
    selection that keeps main queries 0, 2 and 5 of image 0 and all of image
    1, the kept (2, n) mask and the layout before the selection."""
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[0, [1, 3, 4]] = False
    selection = DistinctQuerySelection(None, n, NMS, suppressed)
    main = QuerySet(MAIN, torch.randn(2, n, dims), torch.randn(2, n, 4))
    dn = QuerySet(
        'dn',
        torch.randn(2, num_dn, dims),
        torch.randn(2, num_dn, 4),
        sees_main=True)
    _, _, layout = concat_query_sets([main, dn])
    return selection._layout(layout, keep), keep, layout


def test_isolated_suppressed_queries_never_attend_nor_are_attended_to():
    from mmcv.cnn.bricks.transformer import MultiheadAttention
    torch.manual_seed(0)
    attention = MultiheadAttention(16, 4, batch_first=True).eval()
    layout, keep, before = _selection_case('isolated')
    query, pos = torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    suppressed = torch.zeros(2, 10, dtype=torch.bool)
    suppressed[:, :6] = ~keep
    with torch.no_grad():
        clean = block_self_attention(attention, query, pos, layout)
        # a suppressed query's input does not reach any other query
        noisy_query = query + 10 * suppressed[...,
                                              None] * torch.randn_like(query)
        noisy = block_self_attention(attention, noisy_query, pos, layout)
        assert torch.equal(clean[~suppressed], noisy[~suppressed])
        # and a suppressed query reads nothing but itself
        others = query + 10 * (~suppressed)[...,
                                            None] * torch.randn_like(query)
        alone = block_self_attention(attention, others, pos, layout)
        assert torch.equal(clean[suppressed], alone[suppressed])
    # image 1 kept every query: its mask is the one before the selection
    assert layout[0].mask[1].equal(before[0].mask)


def test_mmdet_mask_lets_distinct_queries_read_suppressed_ones():
    layout, _, _ = _selection_case('mmdet')
    mask = layout[0].mask[0]  # True = blocked
    kept, dropped = [0, 2, 5], [1, 3, 4]
    assert not mask[kept][:, :6].any()  # distinct rows read every query
    assert mask[dropped][:, dropped].all()  # suppressed ones not each other
    assert not mask[dropped][:, kept].any()
    assert not mask[6:, :6].any()  # denoising queries see all main ones
    assert mask[:6, 6:].all()  # main queries never see denoising ones


def test_dense_branch_perturbation_leaves_main_bit_identical():
    model = ddq(True, suppressed='isolated')
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    with noised_branch(model, 'dense'):
        perturbed = decode(model, inputs, samples)
    sizes = [p.num_queries for p in clean['query_sets']]
    assert [p.name for p in clean['query_sets']] == [MAIN, 'dn', 'dense']
    main_and_dn = slice(0, sizes[0] + sizes[1])
    dense_part = slice(sizes[0] + sizes[1], None)
    assert not torch.equal(clean['hidden_states'][:, :, dense_part],
                           perturbed['hidden_states'][:, :, dense_part])
    assert torch.equal(clean['hidden_states'][:, :, main_and_dn],
                       perturbed['hidden_states'][:, :, main_and_dn])
    for before, after in zip(clean['references'], perturbed['references']):
        assert torch.equal(before[:, main_and_dn], after[:, main_and_dn])
    for before, after in zip(clean['query_keep'], perturbed['query_keep']):
        assert torch.equal(before, after)


def test_dense_queries_use_their_own_predictors():
    from mmdet.models.layers.transformer.utils import inverse_sigmoid

    from projects_detr_plus.models.branches import set_predictions
    model = ddq(True)
    layer_outputs = []
    hook = model.decoder.layers[0].register_forward_hook(
        lambda module, args, output: layer_outputs.append(output))
    inputs, samples = make_batch()
    try:
        outputs = decode(model, inputs, samples)
    finally:
        hook.remove()
    dense = outputs['query_sets'][-1]
    head = model.bbox_head
    assert dense.predictors == (head.aux_cls_branches, head.aux_reg_branches)
    assert dense.num_queries == 45  # 1.5 x 30
    with torch.no_grad():
        # box refinement in the decoder
        refs = outputs['references']
        expected = (head.aux_reg_branches[0](layer_outputs[0][:, -45:]) +
                    inverse_sigmoid(refs[0][:, -45:], eps=1e-3)).sigmoid()
        assert torch.allclose(refs[1][:, -45:], expected, atol=1e-6)
        # class predictions for the loss; the main ones by the head's own
        cls, _ = set_predictions(head, outputs['hidden_states'], refs,
                                 outputs['query_sets'])
        states = outputs['hidden_states'][1]
        assert torch.equal(cls[1, :, -45:],
                           head.aux_cls_branches[1](states[:, -45:]))
        assert torch.equal(cls[1, :, :30],
                           head.cls_branches[1](states[:, :30]))


def test_loss_over_kept_queries_equals_loss_without_the_others():
    model = ddq(True)
    head = model.bbox_head
    _, samples = make_batch()
    gts = [s.gt_instances for s in samples]
    metas = [s.metainfo for s in samples]
    torch.manual_seed(0)
    cls, boxes = torch.randn(2, 8, 5), torch.rand(2, 8, 4) * 0.5 + 0.2
    keep = torch.zeros(2, 8, dtype=torch.bool)
    keep[0, [0, 2, 3, 6, 7]] = True
    keep[1, [1, 2, 4, 5, 6]] = True
    keys = ('loss_cls', 'loss_bbox', 'loss_iou')
    kept = matched_set_loss(
        head, '', cls[None], boxes[None], gts, metas, keeps=[keep])
    subset = head.loss_by_feat_single(cls[keep].reshape(2, 5, 5),
                                      boxes[keep].reshape(2, 5, 4), gts, metas)
    for key, expected in zip(keys, subset):
        assert torch.allclose(kept[key], expected)
    full = matched_set_loss(head, '', cls[None], boxes[None], gts, metas)
    for key, expected in zip(keys,
                             head.loss_by_feat_single(cls, boxes, gts, metas)):
        assert torch.allclose(full[key], expected)
    assert not torch.allclose(full['loss_cls'], kept['loss_cls'])


def test_empty_ground_truth_trains_every_parameter():
    model = ddq(True, suppressed='isolated')
    model.train()
    inputs, samples = make_batch(num_gts=(0, 0))
    losses = losses_with_seed(model, inputs, samples)
    # no denoising queries; the dense loss (mmdet's DDQAuxLoss) weighs
    # negatives only in images with ground truth
    assert_empty_gt_losses(losses, no_negatives=('dn_', 'dense_'))
    sum(losses.values()).backward()
    assert not parameters_without_grad(model)


def test_prediction_with_fewer_candidates_than_max_per_img():
    model = ddq(True, suppressed='isolated', iou=0.3)
    model.test_cfg['max_per_img'] = 30 * 5  # every query x class
    inputs, samples = make_batch()
    results = predict(model, inputs, samples)
    with torch.no_grad():  # as predict, on the same (raw) inputs
        outputs = model.forward_transformer(
            model.extract_feat(inputs), copy.deepcopy(samples))
    for keep, result in zip(outputs['query_keep'][-1], results):
        assert len(result.pred_instances) == keep.sum() * 5
        assert (result.pred_instances.scores > 0).all()


def test_configuration_errors():
    cfg = ddq_cfg(True)
    cfg['bbox_head']['type'] = 'DINOHead'
    cfg['bbox_head'].pop('aux_num_pos')
    with pytest.raises(TypeError, match='DDQHeadPlus'):
        build(cfg)
    with pytest.raises(ValueError, match='suppressed'):
        build(ddq_cfg(True, suppressed='hidden'))


def test_ddq_combines_with_other_branches():
    """DDQ plus group and hybrid branches trains, and predicts exactly what
    a plain DDQ holding the same weights predicts."""
    cfg = ddq_cfg(True, suppressed='isolated')
    cfg['branches'] = [
        dict(type='GroupQueryBranch', num_groups=2),
        dict(type='HybridMatchingBranch', num_queries=20, k_one_to_many=2)
    ]
    cfg['train_cfg']['assigner']['type'] = 'GroupOneToOneAssigner'
    torch.manual_seed(0)
    combined = _overlapping_boxes(build(cfg))
    combined.train()
    inputs, samples = make_batch()
    losses = losses_with_seed(combined, inputs, samples)
    for prefix in ('group_', 'hybrid_', 'dense_', 'dn_'):
        assert any(key.startswith(prefix) for key in losses), prefix
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    plain = ddq(True, suppressed='isolated')
    plain.load_state_dict(combined.state_dict(), strict=False)
    for ours, ref in zip(
            predict(combined, inputs, samples),
            predict(plain, inputs, samples)):
        assert torch.equal(ours.pred_instances.bboxes,
                           ref.pred_instances.bboxes)
        assert torch.equal(ours.pred_instances.scores,
                           ref.pred_instances.scores)
