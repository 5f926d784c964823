# DDQ FCN, R50, 8x2 images, 12 epochs on COCO: 41.5 AP in the authors'
# README (jshilong/DDQ, branch main), not measured here.
# Values: jshilong/DDQ projects/configs/ddq_fcn/ddq_fcn_r50_1x.py ("cfg")
# and the defaults of projects/models/ddq_fcn_head.py ("head"); the schedule
# and data are mmdet's 1x COCO bases, as the official config's.
_base_ = [
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',  # 12e, steps 8/11, warmup 500
    'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# a NaN / Inf loss or gradient skips its step and is named (DETR+)
custom_hooks = [dict(type='NonFiniteGuardHook')]

model = dict(
    type='DDQFCN',  # cfg: SingleStageDetector
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
    neck=dict(  # cfg: P3-P7
        type='FPN',
        in_channels=[256, 512, 1024, 2048],
        out_channels=256,
        start_level=1,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='DDQFCNHead',
        num_classes=80,  # cfg
        in_channels=256,  # cfg
        feat_channels=256,  # head (AnchorFreeHead default)
        stacked_convs=4,  # head (AnchorFreeHead default)
        strides=(8, 16, 32, 64, 128),  # cfg
        dqs_cfg=dict(type='nms', iou_threshold=0.7, nms_pre=1000),  # cfg
        num_distinct_queries=300,  # head
        shuffle_channels=64,  # head (`shuffle_channles`)
        # head: the last 2 cls convs and the last reg conv shuffle
        # (shuffled_cls_convs / shuffled_reg_convs None: stacked_convs - 2,
        # - 3)
        # head: main_loss (top-1) and aux_loss (top-8): QFL beta 2, GIoU 2,
        # TopkHungarianAssigner (FocalLossCost 2 on logits, L1 5, GIoU 2),
        # alignment alpha 1, beta 6 -- the DDQFCNHead defaults
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),  # cfg
    train_cfg=None,
    test_cfg=None)

# cfg: AdamW 1e-4 * 0.5, weight decay 0.1; no gradient clip (schedule_1x)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=5e-5, weight_decay=0.1))

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
