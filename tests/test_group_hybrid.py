"""Group DETR and H-DETR hybrid matching as query branches on DINOPlus."""

import pytest
import torch
from mmengine.structures import InstanceData

from detr_testing import (assert_empty_gt_losses, build, decode, dino_cfg,
                          losses_with_seed, make_batch, noised_branch,
                          parameters_without_grad, predict)
from projects_detr_plus.models.task_modules import (GroupOneToOneAssigner,
                                                    OneToOneAssigner,
                                                    with_query_groups)

COSTS = [dict(type='FocalLossCost', weight=2.0),
         dict(type='BBoxL1Cost', weight=5.0, box_format='xyxy'),
         dict(type='IoUCost', iou_mode='giou', weight=2.0)]
GROUP = dict(type='GroupQueryBranch', num_groups=3)
HYBRID = dict(type='HybridMatchingBranch', num_queries=40, k_one_to_many=3)


def group_dino(dn=True, branches=(GROUP, ), dims=128):
    torch.manual_seed(0)
    model = build(dino_cfg(dims=dims, dn=dn, branches=branches,
                           assigner='GroupOneToOneAssigner'))
    model.train()
    return model


def _instances(num_preds, num_gts, seed, size=64.0):
    gen = torch.Generator().manual_seed(seed)

    def boxes(n):
        xy = torch.rand(n, 2, generator=gen) * size * 0.7
        return torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 20 + 1],
                         1)

    preds = InstanceData(scores=torch.randn(num_preds, 4, generator=gen),
                         bboxes=boxes(num_preds))
    gts = InstanceData(bboxes=boxes(num_gts),
                       labels=torch.randint(0, 4, (num_gts, ), generator=gen))
    return preds, gts


@pytest.mark.parametrize('groups,size,num_gts', [(3, 5, 4), (4, 3, 6),
                                                 (2, 6, 0), (1, 5, 3)])
def test_group_assignment_equals_per_group_hungarian(groups, size, num_gts):
    preds, gts = _instances(groups * size, num_gts, seed=groups + num_gts)
    meta = with_query_groups([dict(img_shape=(64, 64))], groups)[0]
    result = GroupOneToOneAssigner(COSTS).assign(preds, gts, meta)
    single = OneToOneAssigner(COSTS)
    for k in range(groups):
        rows = slice(k * size, (k + 1) * size)
        expected = single.assign(preds[rows], gts, dict(img_shape=(64, 64)))
        assert torch.equal(result.gt_inds[rows], expected.gt_inds)
        assert torch.equal(result.labels[rows], expected.labels)
    assert int((result.gt_inds > 0).sum()) == groups * min(size, num_gts)


def test_group_assigner_rejects_uneven_groups():
    preds, gts = _instances(7, 2, seed=0)
    meta = with_query_groups([dict(img_shape=(64, 64))], 3)[0]
    with pytest.raises(ValueError, match='7 queries do not split into 3'):
        GroupOneToOneAssigner(COSTS).assign(preds, gts, meta)


def _slices(outputs):
    slices, start = {}, 0
    for part in outputs['branch_queries']:
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
    assert isinstance(dense['branch_queries'], list)
    torch.testing.assert_close(blocks['hidden_states'],
                               dense['hidden_states'], rtol=1e-4, atol=1e-5)


def test_identical_groups_give_the_main_loss():
    """Extra groups holding the main content queries decode exactly like
    the main group, so their mean loss equals the main loss: the group loss
    is normalised by the positives of all groups."""
    model = group_dino(dn=False)
    branch = model.extra_branches[0]
    with torch.no_grad():
        branch.content.weight.copy_(
            model.query_embedding.weight.repeat(2, 1))
    losses = losses_with_seed(model, *make_batch())
    for key in ('loss_cls', 'loss_bbox', 'loss_iou', 'd0.loss_cls'):
        torch.testing.assert_close(losses[f'group_{key}' if '.' not in key
                                          else key.replace('.', '.group_')],
                                   losses[key], rtol=1e-4, atol=1e-6)


def test_loss_keys_per_branch_and_weights():
    model = group_dino(branches=(GROUP, HYBRID))
    losses = losses_with_seed(model, *make_batch())
    for prefix in ('', 'dn_', 'group_', 'hybrid_'):
        for layer in ('', 'd0.'):
            for name in ('loss_cls', 'loss_bbox', 'loss_iou'):
                key = f'{layer}{prefix}{name}'
                assert key in losses and torch.isfinite(losses[key]), key
                assert losses[key] > 0, key
    heavy = group_dino(branches=(dict(GROUP, loss_weight=3.0),
                                 dict(HYBRID, loss_weight=0.5)))
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for seed in range(2):
        inputs, samples = make_batch(seed=seed)
        data = model.data_preprocessor(
            dict(inputs=inputs, data_samples=samples), training=True)
        losses = model.loss(data['inputs'], data['data_samples'])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    plain = build(dino_cfg(dims=128))
    missing, unexpected = plain.load_state_dict(model.state_dict(),
                                                strict=False)
    assert not missing
    assert unexpected and all(k.startswith('extra_branches.')
                              for k in unexpected)
    inputs, samples = make_batch(seed=5)
    ours, theirs = predict(model, inputs, samples), predict(plain, inputs,
                                                            samples)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
        assert torch.equal(a.pred_instances.scores, b.pred_instances.scores)
        assert torch.equal(a.pred_instances.labels, b.pred_instances.labels)


def test_group_of_one_adds_no_queries():
    model = group_dino(branches=(dict(GROUP, num_groups=1), ))
    outputs = decode(model, *make_batch())
    group = [p for p in outputs['branch_queries'] if p.name == 'group'][0]
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
