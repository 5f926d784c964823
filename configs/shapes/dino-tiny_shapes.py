# DINO small enough to train from scratch on 2 CPU cores on the embedded
# shapes dataset (generated into `data_root` on first use).
# `make demo` trains it; override the length with
# `--cfg-options train_cfg.max_iters=N`.
_base_ = ['./tiny_backbone.py']

model = dict(
    type='DINOPlus',
    num_queries=100,
    with_box_refine=True,
    as_two_stage=True,
    encoder=dict(
        num_layers=2,
        layer_cfg=dict(
            self_attn_cfg=dict(
                type='MultiScaleDeformableAttentionPlus',
                embed_dims=128,
                num_levels=4,
                dropout=0.0),
            ffn_cfg=dict(
                embed_dims=128, feedforward_channels=512, ffn_drop=0.0))),
    decoder=dict(
        num_layers=3,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=128, num_heads=8, dropout=0.0),
            cross_attn_cfg=dict(
                type='MultiScaleDeformableAttentionPlus',
                embed_dims=128,
                num_levels=4,
                dropout=0.0),
            ffn_cfg=dict(
                embed_dims=128, feedforward_channels=512, ffn_drop=0.0)),
        post_norm_cfg=None),
    positional_encoding=dict(
        num_feats=64, normalize=True, offset=0.0, temperature=20),
    bbox_head=dict(
        type='DINOHead',
        embed_dims=128,
        num_classes=6,
        sync_cls_avg_factor=True,
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    dn_cfg=dict(
        label_noise_scale=0.5,
        box_noise_scale=1.0,
        group_cfg=dict(dynamic=True, num_groups=None, num_dn_queries=50)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=100))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2))
