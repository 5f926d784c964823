"""Small DETR models, batches and mmdet references shared by the model
tests."""
import copy
from contextlib import contextmanager

import torch
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

IMAGE_SIZE = 64
NUM_CLASSES = 5


def _backbone():
    return dict(
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None)


def _transformer(dims, enc_layers=1, dec_layers=2):
    # no attention type: our layers default to
    # MultiScaleDeformableAttentionPlus,
    # mmdet's take none
    attn = dict(embed_dims=dims, num_levels=4, dropout=0.0)
    ffn = dict(embed_dims=dims, feedforward_channels=dims * 2, ffn_drop=0.0)
    encoder = dict(
        num_layers=enc_layers,
        layer_cfg=dict(self_attn_cfg=dict(attn), ffn_cfg=ffn))
    decoder = dict(
        num_layers=dec_layers,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=dims, num_heads=8, dropout=0.0),
            cross_attn_cfg=dict(attn),
            ffn_cfg=ffn),
        post_norm_cfg=None)
    return encoder, decoder


def _common(dims):
    encoder, decoder = _transformer(dims)
    return dict(
        num_queries=30,
        data_preprocessor=dict(
            type='DetDataPreprocessor',
            mean=[123.675, 116.28, 103.53],
            std=[58.395, 57.12, 57.375],
            bgr_to_rgb=True,
            pad_size_divisor=1),
        backbone=_backbone(),
        neck=dict(
            type='ChannelMapper',
            in_channels=[32, 64, 128],
            kernel_size=1,
            out_channels=dims,
            act_cfg=None,
            norm_cfg=dict(type='GN', num_groups=32),
            num_outs=4),
        encoder=encoder,
        decoder=decoder,
        train_cfg=dict(
            assigner=dict(
                type='HungarianAssigner',
                match_costs=[
                    dict(type='FocalLossCost', weight=2.0),
                    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                    dict(type='IoUCost', iou_mode='giou', weight=2.0)
                ])),
        test_cfg=dict(max_per_img=30))


def _head(head_type, dims, cls_weight):
    return dict(
        type=head_type,
        num_classes=NUM_CLASSES,
        embed_dims=dims,
        sync_cls_avg_factor=True,
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=cls_weight),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0))


def dino_cfg(plus=True, dims=256, dn=True, branches=(), assigner=None):
    """A tiny DINO; ``plus=False`` gives mmdet's ``DINO``.

    ``branches``: DINOPlus query branch configs; ``assigner``: the
    assigner type (default mmdet's HungarianAssigner).
    """
    cfg = dict(
        type='DINOPlus' if plus else 'DINO',
        with_box_refine=True,
        as_two_stage=True,
        positional_encoding=dict(
            num_feats=dims // 2, normalize=True, offset=0.0, temperature=20),
        bbox_head=_head('DINOHead', dims, 1.0),
        **_common(dims))
    if dn:
        cfg['dn_cfg'] = dict(
            label_noise_scale=0.5,
            box_noise_scale=1.0,
            group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=20))
    if branches:
        cfg['branches'] = [dict(b) for b in branches]
    if assigner:
        cfg['train_cfg']['assigner']['type'] = assigner
    return cfg


def ddq_cfg(plus=True, dims=256, suppressed='mmdet', iou=0.8, dn=True):
    """A tiny DDQ-DETR; ``plus=False`` gives mmdet's ``DDQDETR``."""
    cfg = dino_cfg(plus, dims, dn=dn)
    cfg.update(
        type='DDQDETRPlus' if plus else 'DDQDETR',
        dense_topk_ratio=1.5,
        dqs_cfg=dict(type='nms', iou_threshold=iou))
    cfg['bbox_head']['type'] = 'DDQHeadPlus' if plus else 'DDQDETRHead'
    cfg['bbox_head']['aux_num_pos'] = 4
    if plus:
        cfg['suppressed_queries'] = suppressed
    return cfg


def deformable_detr_cfg(plus=True,
                        refine=False,
                        two_stage=False,
                        branches=(),
                        mixed_selection=False,
                        look_forward_twice=False):
    """A tiny Deformable DETR; ``plus=False`` gives mmdet's.

    ``branches``, ``mixed_selection``, ``look_forward_twice``: DETR+ only
    (H-Deformable-DETR's options).
    """
    cfg = dict(
        type='DeformableDETRPlus' if plus else 'DeformableDETR',
        with_box_refine=refine,
        as_two_stage=two_stage,
        positional_encoding=dict(num_feats=128, normalize=True, offset=-0.5),
        bbox_head=_head('DeformableDETRHead', 256, 2.0),
        **_common(256))
    if mixed_selection:
        cfg['mixed_selection'] = True
    if look_forward_twice:
        cfg['decoder']['look_forward_twice'] = True
    if branches:
        cfg['branches'] = [dict(b) for b in branches]
    return cfg


def build(cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    model = MODELS.build(copy.deepcopy(cfg))
    model.init_weights()
    return model


def make_batch(num_gts=(3, 5), seed=0, size=IMAGE_SIZE):
    """Images (bs, 3, size, size) in [0, 255] and their data samples."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.rand(len(num_gts), 3, size, size, generator=gen) * 255
    samples = []
    for count in num_gts:
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(size, size),
                ori_shape=(size, size),
                scale_factor=(1.0, 1.0),
                batch_input_shape=(size, size),
                pad_shape=(size, size)))
        xy = torch.rand(count, 2, generator=gen) * size * 0.6
        wh = torch.rand(count, 2, generator=gen) * size * 0.3 + 4
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], 1),
            labels=torch.randint(0, NUM_CLASSES, (count, ), generator=gen))
        samples.append(sample)
    return inputs, samples


def losses_with_seed(model, inputs, samples, seed=7):
    torch.manual_seed(seed)
    return model.loss(inputs, copy.deepcopy(samples))


def assert_empty_gt_losses(losses, no_negatives=('dn_', )):
    """Losses of a batch without ground truth: every classification loss
    > 0 except those whose key holds one of ``no_negatives`` (branches
    with no queries or no negatives then); every other loss exactly 0."""
    for key, value in losses.items():
        if 'loss_cls' in key and not any(m in key for m in no_negatives):
            assert value > 0, key
        else:
            assert value == 0, key


def parameters_without_grad(model):
    """Names of the trainable parameters the backward pass left without a
    gradient (DDP's unused-parameter error, mmdet #10989)."""
    return [
        name for name, p in model.named_parameters()
        if p.requires_grad and p.grad is None
    ]


def predict(model, inputs, samples):
    model.eval()
    with torch.no_grad():
        return model.predict(inputs, copy.deepcopy(samples))


def train_steps(model, seeds=(0, 1), lr=1e-3):
    """A few AdamW steps of ``model`` on ``make_batch(seed=...)`` batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for seed in seeds:
        inputs, samples = make_batch(seed=seed)
        data = model.data_preprocessor(
            dict(inputs=inputs, data_samples=samples), training=True)
        losses = model.loss(data['inputs'], data['data_samples'])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()


def assert_same_predictions(model, other, seed=5):
    """Both models predict bit-identical boxes, scores and labels."""
    inputs, samples = make_batch(seed=seed)
    for ours, theirs in zip(
            predict(model, inputs, samples), predict(other, inputs, samples)):
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(ours.pred_instances[key],
                               theirs.pred_instances[key]), key


def decode(model, inputs, samples, training=True):
    """``forward_transformer``'s outputs on a raw batch (preprocessed in
    ``training`` mode, no gradients, the denoising noise seeded)."""
    model.train(training)
    torch.manual_seed(3)
    data = model.data_preprocessor(
        dict(inputs=inputs, data_samples=copy.deepcopy(samples)), training)
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        return model.forward_transformer(feats, data['data_samples'])


@contextmanager
def noised_branch(model, name, scale=5.0, shift=3.0):
    """Inside the block, training branch ``name`` makes noisy queries:
    content + ``scale`` * N(0, 1), reference + ``shift``."""
    branch = {b.name: b for b in model.training_branches}[name]
    original = branch.make_queries

    def noisy(*args, **kwargs):
        queries = original(*args, **kwargs)
        queries.query = queries.query + scale * torch.randn_like(queries.query)
        queries.reference = queries.reference + shift
        return queries

    branch.make_queries = noisy
    try:
        yield
    finally:
        branch.__dict__.pop('make_queries')
