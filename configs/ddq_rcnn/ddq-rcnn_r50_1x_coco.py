# DDQ R-CNN, R50, 8x2 images, 12 epochs on COCO: 44.6 AP in the authors'
# README (jshilong/DDQ, branch main), not measured here.
# Values: jshilong/DDQ projects/configs/ddq_rcnn/ddq_rcnn_r50_1x.py ("cfg"),
# projects/models/ddq_fcn_rpn.py and ddq_fcn_head.py defaults ("head").
_base_ = [
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',  # 12e, steps 8/11, warmup 500
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# a NaN / Inf loss or gradient skips its step and is named (DETR+)
custom_hooks = [dict(type='NonFiniteGuardHook')]

num_stages = 2  # cfg
model = dict(
    type='DDQRCNN',
    rpn_start_level=1,  # cfg (ddq_rcnn.py): the proposal stage on P3-P7
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(  # cfg
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    neck=dict(  # cfg: P2-P7
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=0,
        add_extra_convs='on_input',
        num_outs=6),
    rpn_head=dict(
        type='DDQFCNRPNHead',
        num_distinct_queries=300,  # cfg
        num_classes=80,  # cfg
        in_channels=256,  # cfg
        dqs_cfg=dict(type='nms', iou_threshold=0.7, nms_pre=1000),  # head
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),  # cfg
    roi_head=dict(  # cfg
        type='DDQSparseRoIHead',
        num_stages=num_stages,
        stage_loss_weights=[1] * num_stages,
        proposal_feature_channel=256,
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=2),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32, 64, 128]),
        bbox_head=[
            dict(
                type='DIIHead',
                num_classes=80,
                num_ffn_fcs=2,
                num_heads=8,
                num_cls_fcs=1,
                num_reg_fcs=3,
                feedforward_channels=2048,
                in_channels=256,
                dropout=0.0,
                ffn_act_cfg=dict(type='ReLU', inplace=True),
                dynamic_conv_cfg=dict(
                    type='DynamicConv',
                    in_channels=256,
                    feat_channels=64,
                    out_channels=256,
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
    train_cfg=dict(  # cfg (mmdet 2 cost configs as mmdet 3 match_costs)
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
    test_cfg=dict(rpn=None, rcnn=dict(max_per_img=300)))  # cfg

# cfg: AdamW 1e-4, weight decay 0.05; no gradient clip (schedule_1x)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=0.05))

# schedule_1x: 12 epochs, steps 8 / 11, linear warmup from 0.001 over 500
# iterations -- ending as mmcv 1.x's (full lr at iteration 500: end=501)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(
        type='MultiStepLR',
        begin=0,
        end=12,
        by_epoch=True,
        milestones=[8, 11],
        gamma=0.1)
]
randomness = dict(seed=0)  # official tools/train.sh: --seed 0
