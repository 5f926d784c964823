# Co-DINO-5scale, R50, 8x2 images, 12 epochs on COCO (52.1 AP in the paper):
# our DINO with 5 feature levels plus Co-DETR's auxiliary ATSS and Faster
# R-CNN heads on the encoder output (one more stride-2 level: strides 4-128)
# and their positives as customized positive queries (up to 300 per image and
# head).  Official hyper-parameters: lambda_1 = 1 for the positive queries,
# auxiliary-head losses times lambda_2 * decoder layers = 2 * 6 = 12.
# The heads and queries are dropped at inference: a plain DINO, no NMS.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

num_levels = 5
num_dec_layer = 6
lambda_2 = 2.0
aux_weight = 1.0 * num_dec_layer * lambda_2
strides = [4, 8, 16, 32, 64, 128]

atss_head = dict(
    type='CoATSSHead',
    in_channels=256,
    stacked_convs=1,
    feat_channels=256,
    anchor_generator=dict(
        type='AnchorGenerator',
        ratios=[1.0],
        octave_base_scale=8,
        scales_per_octave=1,
        strides=strides),
    bbox_coder=dict(
        type='DeltaXYWHBBoxCoder',
        target_means=[0.0, 0.0, 0.0, 0.0],
        target_stds=[0.1, 0.1, 0.2, 0.2]),
    loss_cls=dict(
        type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
        loss_weight=1.0 * aux_weight),
    loss_bbox=dict(type='GIoULoss', loss_weight=2.0 * aux_weight),
    loss_centerness=dict(
        type='CrossEntropyLoss', use_sigmoid=True,
        loss_weight=1.0 * aux_weight),
    train_cfg=dict(
        assigner=dict(type='ATSSAssigner', topk=9),
        allowed_border=-1, pos_weight=-1, debug=False))

rcnn_head = dict(
    type='CoRCNNHead',
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator', scales=[8], ratios=[0.5, 1.0, 2.0],
            strides=strides),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss', use_sigmoid=True,
            loss_weight=1.0 * aux_weight),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0 * aux_weight)),
    roi_head=dict(
        type='CoStandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=strides[:5],
            finest_scale=56),
        bbox_head=dict(
            type='Shared2FCBBoxHead',
            in_channels=256,
            fc_out_channels=1024,
            roi_feat_size=7,
            bbox_coder=dict(
                type='DeltaXYWHBBoxCoder',
                target_means=[0.0, 0.0, 0.0, 0.0],
                target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            reg_decoded_bbox=True,
            loss_cls=dict(
                type='CrossEntropyLoss', use_sigmoid=False,
                loss_weight=1.0 * aux_weight),
            loss_bbox=dict(type='GIoULoss', loss_weight=10.0 * aux_weight))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3,
                min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler', num=256, pos_fraction=0.5,
                neg_pos_ub=-1, add_gt_as_proposals=False),
            allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(
            nms_pre=4000, max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5,
                min_pos_iou=0.5, match_low_quality=False, ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler', num=512, pos_fraction=0.25,
                neg_pos_ub=-1, add_gt_as_proposals=True),
            pos_weight=-1, debug=False)))

model = dict(
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[256, 512, 1024, 2048], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))),
    num_feature_levels=num_levels,
    branches=[
        dict(type='CollaborativeBranch', name='co_atss', aux_head=atss_head,
             max_queries=300, loss_weight=1.0),
        dict(type='CollaborativeBranch', name='co_rcnn', aux_head=rcnn_head,
             max_queries=300, loss_weight=1.0),
    ])
