# Deformable DETR (+ iterative box refinement) small enough to train from
# scratch on 2 CPU cores on the embedded shapes dataset.
_base_ = ['./tiny_backbone.py']

model = dict(
    type='DeformableDETRPlus',
    num_queries=100,
    num_feature_levels=4,
    with_box_refine=True,
    as_two_stage=False,
    encoder=dict(
        num_layers=2,
        layer_cfg=dict(
            self_attn_cfg=dict(
                type='MultiScaleDeformableAttentionPlus',
                embed_dims=128,
                batch_first=True),
            ffn_cfg=dict(
                embed_dims=128, feedforward_channels=512, ffn_drop=0.0))),
    decoder=dict(
        num_layers=3,
        return_intermediate=True,
        layer_cfg=dict(
            self_attn_cfg=dict(
                embed_dims=128, num_heads=8, dropout=0.0, batch_first=True),
            cross_attn_cfg=dict(
                type='MultiScaleDeformableAttentionPlus',
                embed_dims=128,
                batch_first=True),
            ffn_cfg=dict(
                embed_dims=128, feedforward_channels=512, ffn_drop=0.0)),
        post_norm_cfg=None),
    positional_encoding=dict(num_feats=64, normalize=True, offset=-0.5),
    bbox_head=dict(
        type='DeformableDETRHead',
        embed_dims=128,
        num_classes=6,
        sync_cls_avg_factor=True,
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='OneToOneAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=100))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=1e-4),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            'sampling_offsets': dict(lr_mult=0.1),
            'reference_points': dict(lr_mult=0.1)
        }))
