# DDQ R-CNN on the shapes data: the tiny backbone with all 4 stages, an FPN
# P2-P7 (32x32 ... 1x1 on a 128x128 image), the DDQ FCN head on P3-P7 as the
# proposal stage (its 100 best distinct queries are the proposals) and the
# released 2 Sparse R-CNN stages at half width (DIIHead 128 channels).
# Optimiser as the released 1x config (AdamW 1e-4, wd 0.05) with the shapes
# batch of 4 (official: 16) and the 10x learning rate of the tiny DETRs.
_base_ = ['./tiny_backbone.py']

num_stages = 2
model = dict(
    type='DDQRCNN',
    rpn_start_level=1,
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(
        _delete_=True,
        type='FPN',
        in_channels=[32, 64, 128, 256],
        out_channels=128,
        start_level=0,
        add_extra_convs='on_input',
        num_outs=6),
    rpn_head=dict(
        type='DDQFCNRPNHead',
        num_classes=6,
        in_channels=128,
        feat_channels=128,
        shuffle_channels=32,
        num_distinct_queries=100,
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
    roi_head=dict(
        type='DDQSparseRoIHead',
        num_stages=num_stages,
        stage_loss_weights=[1] * num_stages,
        proposal_feature_channel=128,
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2),
            out_channels=128,
            featmap_strides=[4, 8, 16, 32, 64, 128]),
        bbox_head=[
            dict(
                type='DIIHead',
                num_classes=6,
                num_ffn_fcs=2,
                num_heads=8,
                num_cls_fcs=1,
                num_reg_fcs=3,
                feedforward_channels=512,
                in_channels=128,
                dropout=0.0,
                ffn_act_cfg=dict(type='ReLU', inplace=True),
                dynamic_conv_cfg=dict(
                    type='DynamicConv',
                    in_channels=128,
                    feat_channels=32,
                    out_channels=128,
                    input_feat_shape=7,
                    act_cfg=dict(type='ReLU', inplace=True),
                    norm_cfg=dict(type='LN')),
                loss_bbox=dict(type='L1Loss', loss_weight=5.0),
                loss_iou=dict(type='GIoULoss', loss_weight=2.0),
                loss_cls=dict(
                    type='FocalLoss',
                    use_sigmoid=True,
                    gamma=2.0,
                    alpha=0.25,
                    loss_weight=2.0),
                bbox_coder=dict(
                    type='DeltaXYWHBBoxCoder',
                    clip_border=False,
                    target_means=[0., 0., 0., 0.],
                    target_stds=[0.5, 0.5, 1., 1.])) for _ in range(num_stages)
        ]),
    train_cfg=dict(
        rpn=None,
        rcnn=[
            dict(
                assigner=dict(
                    type='HungarianAssigner',
                    match_costs=[
                        dict(type='FocalLossCost', weight=2.0),
                        dict(type='BBoxL1Cost', weight=5.0, box_format='xyxy'),
                        dict(type='IoUCost', iou_mode='giou', weight=2.0)
                    ]),
                sampler=dict(type='PseudoSampler'),
                pos_weight=1) for _ in range(num_stages)
        ]),
    test_cfg=dict(rpn=None, rcnn=dict(max_per_img=100)))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
    clip_grad=None)
