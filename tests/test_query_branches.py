"""The query-branch architecture on DINO: isolation, empty GT, bounds."""
import copy

import pytest
import torch

from detr_testing import (assert_empty_gt_losses, build, decode, dino_cfg,
                          losses_with_seed, make_batch, noised_branch,
                          parameters_without_grad, predict)
from projects_detr_plus.models.branches import (MAIN, QuerySet,
                                                concat_query_sets,
                                                split_query_sets)


@pytest.fixture(scope='module')
def dino():
    torch.manual_seed(0)
    model = build(dino_cfg(dims=128))
    model.train()
    return model


def _parts(bs=2, sizes=(4, 3, 2), dim=8):
    names = [MAIN, 'a', 'b']
    return [
        QuerySet(
            name,
            torch.randn(bs, n, dim),
            torch.randn(bs, n, 4),
            sees_main=(name == 'a')) for name, n in zip(names, sizes)
    ]


def test_dense_mask_layout():
    parts = _parts()
    parts[2].attn_mask = torch.tensor([[False, True], [False, False]])
    query, reference, (block, ) = concat_query_sets(parts, dense_mask=True)
    mask = block.mask
    assert (block.start, block.end, block.num_groups) == (0, 9, 1)
    assert query.shape == (2, 9, 8) and reference.shape == (2, 9, 4)
    main, a, b = slice(0, 4), slice(4, 7), slice(7, 9)
    assert not mask[main, main].any()
    assert mask[main, 4:].all(), 'main never sees another branch'
    assert not mask[a, main].any(), 'branch a may see main'
    assert mask[b, main].all(), 'branch b may not'
    assert mask[a, b].all() and mask[b, a].all()
    assert torch.equal(mask[b, b], parts[2].attn_mask)
    pieces = split_query_sets(query, parts, dim=1)
    assert all(torch.equal(p.query, x) for p, x in zip(parts, pieces))


def test_attention_blocks_group_what_may_see_each_other():
    parts = _parts(sizes=(4, 3, 6))
    parts[2].num_groups = 3
    parts[2].attn_mask = torch.tensor([[False, True], [False, False]])
    _, _, blocks = concat_query_sets(parts)
    main_block, group_block = blocks
    assert (main_block.start, main_block.end) == (0, 7)
    assert main_block.num_groups == 1
    dense = concat_query_sets(parts, dense_mask=True)[2][0].mask
    assert torch.equal(main_block.mask, dense[:7, :7])
    assert (group_block.start, group_block.num_groups,
            group_block.group_size) == (7, 3, 2)
    assert torch.equal(group_block.mask, parts[2].attn_mask)
    # the dense mask of the grouped branch is block-diagonal
    assert torch.equal(
        dense[7:, 7:],
        torch.block_diag(*[~parts[2].attn_mask] * 3).logical_not())


def test_padding_queries_are_invisible():
    """Keys of padding queries are masked (but a group with nothing real
    keeps its first query visible), and real queries' outputs do not depend
    on the padding."""
    from mmcv.cnn.bricks.transformer import MultiheadAttention

    from projects_detr_plus.models.layers.attention_layout import \
        block_self_attention
    torch.manual_seed(0)
    attn = MultiheadAttention(8, 2, batch_first=True).eval()
    parts = _parts(sizes=(4, 3, 3))
    parts[2].padding = torch.tensor([[False, False, True], [True, True, True]])
    query, _, blocks = concat_query_sets(parts)
    assert torch.equal(
        blocks[1].padding,
        torch.tensor([[False, False, True], [False, True, True]]))
    pos = torch.zeros_like(query)
    with torch.no_grad():
        out = block_self_attention(attn, query, pos, blocks)
        # image 0's two real queries of branch b, decoded without the pad
        alone = attn(query=query[:1, 7:9], query_pos=pos[:1, 7:9])
        changed = query.clone()
        changed[0, 9] += 10.0  # the padding query of image 0
        again = block_self_attention(attn, changed, pos, blocks)
        dense = concat_query_sets(parts, dense_mask=True)[2]
        dense_out = block_self_attention(attn, query, pos, dense)
    torch.testing.assert_close(out[:1, 7:9], alone)
    assert torch.equal(out[:, :9], again[:, :9])
    assert torch.isfinite(out).all() and torch.isfinite(dense_out).all()
    torch.testing.assert_close(out, dense_out)


def test_branch_order_and_names_are_checked():
    parts = _parts()
    with pytest.raises(ValueError, match='before the others'):
        concat_query_sets([parts[0], parts[2], parts[1]])
    parts[2].name = 'a'
    with pytest.raises(ValueError, match='unique'):
        concat_query_sets(parts)
    with pytest.raises(ValueError, match='equal groups'):
        QuerySet('g', torch.zeros(1, 5, 8), torch.zeros(1, 5, 4), num_groups=2)


def test_main_alone_needs_no_mask():
    _, _, mask = concat_query_sets(_parts()[:1])
    assert mask is None


def test_denoising_perturbation_leaves_main_bit_identical(dino):
    inputs, samples = make_batch()
    clean = decode(dino, inputs, samples)
    with noised_branch(dino, 'dn', scale=5.0, shift=5.0):
        noisy = decode(dino, inputs, samples)
    num_main = clean['query_sets'][0].num_queries
    assert clean['query_sets'][1].num_queries > 0
    dn_clean = clean['hidden_states'][:, :, num_main:]
    dn_noisy = noisy['hidden_states'][:, :, num_main:]
    assert not torch.equal(dn_clean, dn_noisy), 'the perturbation bites'
    assert torch.equal(clean['hidden_states'][:, :, :num_main],
                       noisy['hidden_states'][:, :, :num_main])
    for ref_clean, ref_noisy in zip(clean['references'], noisy['references']):
        assert torch.equal(ref_clean[:, :num_main], ref_noisy[:, :num_main])


def test_predict_same_with_or_without_denoising(dino):
    plain = build(dino_cfg(dims=128, dn=False))
    state = {
        k: v
        for k, v in dino.state_dict().items()
        if not k.startswith('dn_query_generator.')
    }
    plain.load_state_dict(state, strict=True)
    inputs, samples = make_batch()
    with_dn = predict(copy.deepcopy(dino), inputs, samples)
    without = predict(plain, inputs, samples)
    for a, b in zip(with_dn, without):
        assert torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
        assert torch.equal(a.pred_instances.scores, b.pred_instances.scores)
    plain.train()
    losses = losses_with_seed(plain, *make_batch())
    assert not any('dn_' in key for key in losses)


def test_losses_with_ground_truth_are_positive(dino):
    losses = losses_with_seed(dino, *make_batch())
    assert any(key.startswith('dn_') for key in losses)
    assert {key
            for key in losses if 'enc_' in key
            } == {'enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'}
    for key, value in losses.items():
        assert torch.isfinite(value) and value > 0, key


def test_empty_ground_truth_losses_and_gradients(dino):
    """No GT: box/IoU/DN losses exactly 0, classification > 0, and every
    trainable parameter still gets a gradient (DDP, mmdet #10989)."""
    model = copy.deepcopy(dino)
    model.zero_grad(set_to_none=True)
    inputs, samples = make_batch(num_gts=(0, 0))
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training=True)
    losses = model.loss(data['inputs'], data['data_samples'])
    assert_empty_gt_losses(losses)
    sum(losses.values()).backward()
    missing = parameters_without_grad(model)
    assert not missing, f'no gradient for {missing}'


def test_crowded_image_has_bounded_denoising_queries(dino):
    """500 GT boxes: the DN branch stays within 2 * num_dn_queries."""
    generator = dino.dn_query_generator
    _, samples = make_batch(num_gts=(500, 3))
    queries = generator.make_queries(None, None, None, samples)
    bound = 2 * generator.num_dn_queries
    assert 0 < queries.num_queries <= bound
    assert max(len(gt) for gt in queries.meta['gt_instances']) == \
        generator.max_targets
    losses = losses_with_seed(dino, *make_batch(num_gts=(500, 3)))
    assert all(torch.isfinite(v) for v in losses.values())


def test_uncapped_crowd_would_exceed_bound():
    """Without the cap, mmdet's generator makes 2 queries per GT (#11021)."""
    from mmdet.models.layers import CdnQueryGenerator
    generator = CdnQueryGenerator(
        num_classes=5,
        embed_dims=16,
        num_matching_queries=10,
        group_cfg=dict(dynamic=True, num_dn_queries=20))
    _, samples = make_batch(num_gts=(500, ))
    _, _, _, meta = generator(samples)
    assert meta['num_denoising_queries'] == 1000 > 2 * 20
