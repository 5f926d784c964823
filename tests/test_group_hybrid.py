"""Group DETR and H-DETR hybrid matching as query branches on DINOPlus."""

import pytest
import torch
from mmengine.structures import InstanceData

from detr_testing import (assert_empty_gt_losses, assert_same_predictions,
                          build, decode, dino_cfg, losses_with_seed,
                          make_batch, noised_branch, parameters_without_grad,
                          train_steps)
from projects_detr_plus.models.task_modules import (GroupOneToOneAssigner,
                                                    OneToOneAssigner)

COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xyxy'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0)
]
GROUP = dict(type='GroupQueryBranch', num_groups=3)
HYBRID = dict(type='HybridMatchingBranch', num_queries=40, k_one_to_many=3)


def group_dino(dn=True, branches=(GROUP, ), dims=128):
    torch.manual_seed(0)
    model = build(
        dino_cfg(
            dims=dims,
            dn=dn,
            branches=branches,
            assigner='GroupOneToOneAssigner'))
    model.train()
    return model


def _instances(num_preds, num_gts, seed, size=64.0):
    gen = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=gen) * size * 0.7
        return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 20 + 1],
                         1)

    preds = InstanceData(
        scores=torch.randn(num_preds, 4, generator=gen),
        bboxes=boxes(num_preds))
    gts = InstanceData(
        bboxes=boxes(num_gts),
        labels=torch.randint(0, 4, (num_gts, ), generator=gen))
    return preds, gts


@pytest.mark.parametrize('groups,size,num_gts', [(3, 5, 4), (4, 3, 6),
                                                 (2, 6, 0), (1, 5, 3)])
def test_group_assignment_equals_per_group_hungarian(groups, size, num_gts):
    preds, gts = _instances(groups * size, num_gts, seed=groups + num_gts)
    result = GroupOneToOneAssigner(COSTS).assign(
        preds, gts, dict(img_shape=(64, 64)), num_groups=groups)
    single = OneToOneAssigner(COSTS)
    for k in range(groups):
        rows = slice(k * size, (k + 1) * size)
        expected = single.assign(preds[rows], gts, dict(img_shape=(64, 64)))
        assert torch.equal(result.gt_inds[rows], expected.gt_inds)
        assert torch.equal(result.labels[rows], expected.labels)
    assert int((result.gt_inds > 0).sum()) == groups * min(size, num_gts)


def test_group_assigner_rejects_uneven_groups():
    preds, gts = _instances(7, 2, seed=0)
    with pytest.raises(ValueError, match='7 queries do not split into 3'):
        GroupOneToOneAssigner(COSTS).assign(
            preds, gts, dict(img_shape=(64, 64)), num_groups=3)


def _slices(outputs):
    slices, start = {}, 0
    for part in outputs['query_sets']:
        slices[part.name] = slice(start, start + part.num_queries)
        start += part.num_queries
    return slices


@pytest.mark.parametrize('perturbed', ['group', 'hybrid'])
def test_perturbing_a_branch_leaves_main_bit_identical(perturbed):
    model = group_dino(branches=(GROUP, HYBRID))
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    with noised_branch(model, perturbed):
        noisy = decode(model, inputs, samples)
    where = _slices(clean)
    states_clean, states_noisy = clean['hidden_states'], noisy['hidden_states']
    assert not torch.equal(states_clean[:, :, where[perturbed]],
                           states_noisy[:, :, where[perturbed]])
    for name in ('main', 'dn'):
        assert torch.equal(states_clean[:, :, where[name]],
                           states_noisy[:, :, where[name]]), name
        for ref_clean, ref_noisy in zip(clean['references'],
                                        noisy['references']):
            assert torch.equal(ref_clean[:, where[name]],
                               ref_noisy[:, where[name]]), name


def test_extra_groups_are_isolated_from_each_other():
    """Group 2 perturbed: group 1 of the group branch does not change."""
    model = group_dino(dn=False)
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    size = model.num_queries
    with torch.no_grad():
        model.extra_branches[0].content.weight[size:] += 1.0
    noisy = decode(model, inputs, samples)
    first = slice(size, 2 * size)
    assert torch.equal(clean['hidden_states'][:, :, first],
                       noisy['hidden_states'][:, :, first])
    assert not torch.equal(clean['hidden_states'][:, :, 2 * size:],
                           noisy['hidden_states'][:, :, 2 * size:])


def test_folded_blocks_equal_one_dense_mask():
    model = group_dino(branches=(GROUP, HYBRID))
    inputs, samples = make_batch()
    blocks = decode(model, inputs, samples)
    model.dense_self_attn_mask = True
    dense = decode(model, inputs, samples)
    assert isinstance(dense['query_sets'], list)
    torch.testing.assert_close(
        blocks['hidden_states'], dense['hidden_states'], rtol=1e-4, atol=1e-5)


def _copy_main_group(model):
    """Give every extra group the main group's encoder heads and content."""
    branch, head = model.extra_branches[0], model.bbox_head
    layers = model.decoder.num_layers
    with torch.no_grad():
        for g in range(branch.num_extra_groups):
            branch.memory_trans_fc[g].load_state_dict(
                model.memory_trans_fc.state_dict())
            branch.memory_trans_norm[g].load_state_dict(
                model.memory_trans_norm.state_dict())
            branch.enc_cls[g].load_state_dict(
                head.cls_branches[layers].state_dict())
            branch.enc_reg[g].load_state_dict(
                head.reg_branches[layers].state_dict())
            branch.content_tables()[g].copy_(model.query_embedding.weight)


def test_identical_groups_give_the_single_group_loss():
    """K groups with the main group's heads and content decode and score
    exactly like it; the loss is their equal-weight average, so it equals
    the loss of the same model with one group."""
    model = group_dino(dn=False)
    _copy_main_group(model)
    single = build(dino_cfg(dims=128, dn=False))
    single.load_state_dict(model.state_dict(), strict=False)
    single.train()
    losses = losses_with_seed(model, *make_batch())
    expected = losses_with_seed(single, *make_batch())
    torch.testing.assert_close(
        sum(losses.values()), sum(expected.values()), rtol=1e-5, atol=1e-6)
    for key, value in expected.items():  # main group: weight 1 / K
        torch.testing.assert_close(losses[key], value / 3)
        group_key = ('.group_'.join(key.split('.'))
                     if '.' in key else f'group_{key}')
        torch.testing.assert_close(
            losses[group_key], value * 2 / 3, rtol=1e-4, atol=1e-6)


def test_each_group_selects_its_own_anchors():
    """Perturbing group 2's encoder box head moves group 2's anchors
    only; the main and group-1 anchors stay bit-identical."""
    model = group_dino(dn=False)
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    with torch.no_grad():
        model.extra_branches[0].enc_reg[1][-1].bias += 0.5
    moved = decode(model, inputs, samples)
    size = model.num_queries
    first, second = clean['references'][0], moved['references'][0]
    assert torch.equal(first[:, :2 * size], second[:, :2 * size])
    assert not torch.equal(first[:, 2 * size:], second[:, 2 * size:])
    groups = first.reshape(first.shape[0], 3, size, 4)
    assert not torch.equal(groups[:, 0], groups[:, 1])  # own top-k


def test_each_group_has_isolated_denoising_queries():
    """Group 1's denoising queries: perturbing them changes nothing in the
    main group, its denoising queries or group 2; each group's
    denoising queries see their group's matching queries."""
    model = group_dino(dn=True)
    inputs, samples = make_batch()
    clean = decode(model, inputs, samples)
    parts = {p.name: p for p in clean['query_sets']}
    group, dn = parts['group'], parts['dn']
    size, num_dn = model.num_queries, dn.num_queries
    assert group.num_queries == 2 * (size + num_dn)
    assert group.attn_mask[:size, size:].all()  # matching does not see DN
    assert not group.attn_mask[size:, :size].any()  # DN sees matching
    assert torch.equal(group.attn_mask[size:, size:], dn.attn_mask)
    denoiser = model.extra_branches[0].denoisers[0]
    original = denoiser.make_queries

    def noisy(*args, **kwargs):
        queries = original(*args, **kwargs)
        queries.query = queries.query + 5.0
        return queries

    denoiser.make_queries = noisy
    moved = decode(model, inputs, samples)
    start = size + num_dn  # the group branch follows main + dn
    g1_dn = slice(start + size, start + size + num_dn)
    g2 = slice(start + size + num_dn, None)
    states, states_moved = clean['hidden_states'], moved['hidden_states']
    assert not torch.equal(states[:, :, g1_dn], states_moved[:, :, g1_dn])
    assert torch.equal(states[:, :, :start + size],
                       states_moved[:, :, :start + size])
    assert torch.equal(states[:, :, g2], states_moved[:, :, g2])


def test_group_denoising_losses_are_averaged_over_groups():
    model = group_dino(dn=True)
    losses = losses_with_seed(model, *make_batch())
    for key in ('group_dn_loss_cls', 'd0.group_dn_loss_bbox',
                'group_enc_loss_iou'):
        assert key in losses and losses[key] > 0, key
    shared = group_dino(
        dn=False, branches=(dict(GROUP, shared_anchors=True), ))
    shared_losses = losses_with_seed(shared, *make_batch())
    assert not any('group_enc_' in key for key in shared_losses)
    assert not hasattr(shared.extra_branches[0], 'enc_cls')
    main_only = group_dino(dn=True, branches=(dict(GROUP, dn_cfg=None), ))
    assert len(main_only.extra_branches[0].denoisers) == 0
    main_only_losses = losses_with_seed(main_only, *make_batch())
    assert 'dn_loss_cls' in main_only_losses
    assert not any('group_dn_' in key for key in main_only_losses)


def test_group_content_initialised_like_main():
    model = group_dino(dn=False)
    bound = (6.0 / (model.num_queries + model.embed_dims))**0.5
    main = model.query_embedding.weight
    for table in model.extra_branches[0].content_tables():
        assert table.abs().max() <= bound
        assert abs(float(table.std()) -
                   float(main.std())) < 0.1 * float(main.std())


def test_loss_keys_per_branch_and_weights():
    model = group_dino(branches=(GROUP, HYBRID))
    losses = losses_with_seed(model, *make_batch())
    for prefix in ('', 'dn_', 'group_', 'hybrid_'):
        for layer in ('', 'd0.'):
            for name in ('loss_cls', 'loss_bbox', 'loss_iou'):
                key = f'{layer}{prefix}{name}'
                assert key in losses and torch.isfinite(losses[key]), key
                assert losses[key] > 0, key
    heavy = group_dino(
        branches=(dict(GROUP, loss_weight=3.0), dict(HYBRID, loss_weight=0.5)))
    heavy_losses = losses_with_seed(heavy, *make_batch())
    for prefix, weight in (('group_', 3.0), ('hybrid_', 0.5)):
        torch.testing.assert_close(heavy_losses[f'{prefix}loss_iou'],
                                   losses[f'{prefix}loss_iou'] * weight)


def test_hybrid_matches_each_ground_truth_k_times():
    model = group_dino(dn=False, branches=(HYBRID, ))
    assigner = model.bbox_head.assigner
    positives = []
    original = assigner.assign

    def counting(pred_instances, gt_instances, img_meta=None, **kwargs):
        result = original(pred_instances, gt_instances, img_meta)
        positives.append((len(pred_instances), len(gt_instances),
                          int((result.gt_inds > 0).sum())))
        return result

    assigner.assign = counting
    losses_with_seed(model, *make_batch(num_gts=(3, 5)))
    hybrid = [p for p in positives if p[0] == HYBRID['num_queries']]
    # 2 decoder layers x 2 images, ground truth repeated k = 3 times
    assert sorted(hybrid) == [(40, 9, 9)] * 2 + [(40, 15, 15)] * 2


def test_empty_ground_truth_with_branches():
    model = group_dino(branches=(GROUP, HYBRID))
    model.zero_grad(set_to_none=True)
    losses = losses_with_seed(model, *make_batch(num_gts=(0, 0)))
    assert_empty_gt_losses(losses)
    sum(losses.values()).backward()
    assert not parameters_without_grad(model)


def test_trained_group_dino_predicts_like_plain_dino():
    model = group_dino(branches=(GROUP, HYBRID))
    train_steps(model)
    plain = build(dino_cfg(dims=128))
    missing, unexpected = plain.load_state_dict(
        model.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(
        k.startswith('extra_branches.') for k in unexpected)
    assert_same_predictions(model, plain)


def test_group_of_one_adds_no_queries():
    model = group_dino(branches=(dict(GROUP, num_groups=1), ))
    outputs = decode(model, *make_batch())
    group = [p for p in outputs['query_sets'] if p.name == 'group'][0]
    assert group.num_queries == 0
    losses = losses_with_seed(model, *make_batch())
    assert not any('group_' in key for key in losses)


def test_branch_misconfiguration_errors():
    with pytest.raises(TypeError, match='GroupOneToOneAssigner'):
        model = build(dino_cfg(dims=128, branches=(GROUP, )))
        model.train()
        losses_with_seed(model, *make_batch())
    too_many = group_dino(branches=(dict(HYBRID, num_queries=5000), ))
    with pytest.raises(ValueError, match='lower num_queries'):
        losses_with_seed(too_many, *make_batch())
    with pytest.raises(ValueError, match='unique'):
        group_dino(branches=(GROUP, GROUP))
    with pytest.raises(ValueError, match='set by the detector'):
        group_dino(branches=(dict(GROUP, embed_dims=64), ))
