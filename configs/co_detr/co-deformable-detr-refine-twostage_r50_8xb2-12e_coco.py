# Co-Deformable-DETR, R50, 8x2 images, 12 epochs on COCO (49.5 AP in
# Sense-X/Co-DETR's README): two-stage Deformable DETR with box refinement,
# mixed query selection and look forward twice, plus Co-DETR's auxiliary
# Faster R-CNN and ATSS heads on the encoder output (one shared stride-2
# level on top: strides 8-128), whose candidates become customized queries
# with their own positional queries and features.  Heads and queries are
# dropped at inference: a plain Deformable DETR.
#
# [cfg] = Sense-X/Co-DETR projects/configs/co_deformable_detr/
#         co_deformable_detr_r50_1x_coco.py; [head] = its
#         projects/models/co_deformable_detr_head.py and transformer.py.
# Everything not set here is mmdet's Deformable DETR refine + two-stage,
# which equals [cfg] there (4 levels, 6 + 6 layers, costs 2/5/2, loss
# weights 2/5/2, positional offset -0.5, sync_cls_avg_factor, lr multipliers
# 0.1 for backbone / sampling_offsets / reference_points, clip 0.1, top 100
# at test without NMS).
_base_ = ('../deformable_detr/'
          'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py')
custom_hooks = [dict(type='RandomStateHook'), dict(type='NonFiniteGuardHook')]

num_dec_layer = 6  # [cfg] num_dec_layer = 6
lambda_2 = 2.0  # [cfg] lambda_2 = 2.0
aux_weight = 1.0 * num_dec_layer * lambda_2  # [cfg] 1.0*6*2
strides = [8, 16, 32, 64, 128]  # [cfg] anchor strides
ffn = dict(
    feedforward_channels=2048,  # [cfg] feedforward_channels=2048
    ffn_drop=0.0)  # [cfg] ffn_dropout=0.0

# [cfg] rpn_head, roi_head[0] and train_cfg[1]
rcnn_head = dict(
    type='CoRCNNHead',
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(
            type='AnchorGenerator',
            octave_base_scale=4,
            scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0],
            strides=strides),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(
            type='CrossEntropyLoss',
            use_sigmoid=True,
            loss_weight=1.0 * aux_weight),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0 * aux_weight)),
    roi_head=dict(
        type='CoStandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=256,
            featmap_strides=strides[:4],  # [cfg] [8, 16, 32, 64]
            finest_scale=112),  # [cfg] finest_scale=112
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
                type='CrossEntropyLoss',
                use_sigmoid=False,
                loss_weight=1.0 * aux_weight),
            loss_bbox=dict(type='GIoULoss', loss_weight=10.0 * aux_weight))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.7,
                neg_iou_thr=0.3,
                min_pos_iou=0.3,
                match_low_quality=True,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=256,
                pos_fraction=0.5,
                neg_pos_ub=-1,
                add_gt_as_proposals=False),
            allowed_border=-1,
            pos_weight=-1,
            debug=False),
        rpn_proposal=dict(
            nms_pre=4000,
            max_per_img=1000,
            nms=dict(type='nms', iou_threshold=0.7),
            min_bbox_size=0),
        rcnn=dict(
            assigner=dict(
                type='MaxIoUAssigner',
                pos_iou_thr=0.5,
                neg_iou_thr=0.5,
                min_pos_iou=0.5,
                match_low_quality=False,
                ignore_iof_thr=-1),
            sampler=dict(
                type='RandomSampler',
                num=512,
                pos_fraction=0.25,
                neg_pos_ub=-1,
                add_gt_as_proposals=True),
            pos_weight=-1,
            debug=False)))

# [cfg] bbox_head[0] (CoATSSHead) and train_cfg[2]
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
        type='FocalLoss',
        use_sigmoid=True,
        gamma=2.0,
        alpha=0.25,
        loss_weight=1.0 * aux_weight),
    loss_bbox=dict(type='GIoULoss', loss_weight=2.0 * aux_weight),
    loss_centerness=dict(
        type='CrossEntropyLoss',
        use_sigmoid=True,
        loss_weight=1.0 * aux_weight),
    train_cfg=dict(
        assigner=dict(type='ATSSAssigner', topk=9),
        allowed_border=-1,
        pos_weight=-1,
        debug=False))

# [head] CoDeformDETRHead: max_pos_coords=300, lambda_1=1, at least 9
# queries per image padded with negatives; CoDeformableDetrTransformer:
# positional + content query from aux_pos_trans (2 x 256), with_coord_feat
# (default True), head_pos_embed (a (2, 1) table, xavier-initialised by
# the transformer's init_weights: a learnable scalar per head)
co_query = dict(
    type='CollaborativeBranch',
    max_queries=300,
    min_queries=9,
    zero_padding=False,
    loss_weight=1.0,
    own_query_pos=True,
    coord_feat=True,
    head_embedding='scalar')

model = dict(
    num_queries=300,  # [cfg] num_query=300
    mixed_selection=True,  # [cfg] mixed_selection=True
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(dropout=0.0),  # [cfg] dropout=0.0
            ffn_cfg=ffn)),
    decoder=dict(
        look_forward_twice=True,  # [cfg] look_forward_twice=True
        layer_cfg=dict(
            self_attn_cfg=dict(dropout=0.0),  # [cfg] dropout=0.0
            cross_attn_cfg=dict(dropout=0.0),  # [cfg] dropout=0.0
            ffn_cfg=ffn)),
    # [cfg] head order: RoI heads (index 0), then one-stage heads (1)
    branches=[
        dict(co_query, name='co_rcnn', aux_head=rcnn_head),
        dict(co_query, name='co_atss', aux_head=atss_head),
    ])

optim_wrapper = dict(
    optimizer=dict(
        lr=2e-4,  # [cfg] lr=2e-4
        weight_decay=1e-4))  # [cfg] weight_decay=1e-4

max_epochs = 12  # [cfg] max_epochs=12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[11],  # [cfg] step=[11]
        gamma=0.1)
]
train_dataloader = dict(batch_size=2)  # [cfg] samples_per_gpu=2 (8 GPUs)
auto_scale_lr = dict(base_batch_size=16)
