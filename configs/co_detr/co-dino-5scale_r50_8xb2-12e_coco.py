# Co-DINO-5scale, R50, 8x2 images, 12 epochs on COCO (52.1 AP in the paper):
# the official recipe of Sense-X/Co-DETR as ported in mmdet's
# projects/CO-DETR: our DINO with 5 feature levels plus Co-DETR's auxiliary
# Faster R-CNN and ATSS heads on the encoder output (one shared stride-2
# level on top: strides 4-128) whose candidates become customized queries.
# "official: X" below names the value's source in mmdet's
# projects/CO-DETR/configs/codino/co_dino_5scale_r50_lsj_8xb2_1x_coco.py
# (LSJ) and co_dino_5scale_r50_8xb2_1x_coco.py (this schedule, without LSJ),
# which inherits everything else from the first.  The heads and queries are
# dropped at inference: a DINO plus the official soft-NMS.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

num_levels = 5  # official: num_feature_levels=5, neck num_outs=5
num_dec_layer = 6  # official: num_dec_layer = 6
loss_lambda = 2.0  # official: loss_lambda = 2.0 (the paper's lambda_2)
aux_weight = 1.0 * num_dec_layer * loss_lambda  # official: 1.0*6*2 = 12
strides = [4, 8, 16, 32, 64, 128]  # official anchor strides

# official: rpn_head, roi_head[0] and train_cfg[1] / test_cfg[1]
rcnn_head = dict(
    type='CoRCNNHead',
    rpn_head=dict(
        type='RPNHead',
        in_channels=256,
        feat_channels=256,
        anchor_generator=dict(  # official: 9 anchors per location
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
            featmap_strides=strides[:5],  # official: [4, 8, 16, 32, 64]
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

# official: bbox_head[0] (CoATSSHead) and train_cfg[2]
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

# official CoDINOHead defaults: max_pos_coords=300, at least 9 queries per
# image padded with the head's negatives (use_zero_padding=False); the
# customized queries' losses weigh 1 (the paper's lambda_1)
co_query = dict(
    type='CollaborativeBranch',
    max_queries=300,
    min_queries=9,
    zero_padding=False,
    loss_weight=1.0)

model = dict(
    backbone=dict(out_indices=(0, 1, 2, 3)),
    neck=dict(in_channels=[256, 512, 1024, 2048], num_outs=num_levels),
    # official: encoder with_cp=4 (FairScale); ours: torch's checkpointing
    encoder=dict(
        num_cp=4, layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))),
    num_feature_levels=num_levels,
    content_init='normal',  # official: CoDinoTransformer.init_weights N(0,1)
    bbox_head=dict(
        # official CoDINOHead.forward decodes boxes with inverse_sigmoid
        # eps 1e-3 (mmdet's DINOHead: 1e-5)
        type='DINOHeadPlus',
        reference_eps=1e-3,
        # Sense-X/Co-DETR co_dino_5scale_r50_1x_coco.py: sync_cls_avg_factor
        # =True (mmdet's port leaves DETRHead's False; it only matters
        # with several GPUs)
        sync_cls_avg_factor=True,
        # official: QualityFocalLoss beta 2 for the decoder, denoising,
        # encoder and customized-query losses (matching cost stays focal)
        loss_cls=dict(
            _delete_=True,
            type='QualityFocalLoss',
            use_sigmoid=True,
            beta=2.0,
            loss_weight=1.0)),
    # official order of the auxiliary heads: RoI heads, then one-stage ones
    branches=[
        dict(co_query, name='co_rcnn', aux_head=rcnn_head),
        dict(co_query, name='co_atss', aux_head=atss_head),
    ],
    # official test_cfg[0]: top 300, then soft-NMS (+0.2 AP per the
    # maintainers); `nms=None` gives the NMS-free DINO output
    test_cfg=dict(
        max_per_img=300, nms=dict(type='soft_nms', iou_threshold=0.8)))

# not official: at most 100 ground truths per image are denoised (DINO base,
# dn_cfg.max_targets; mmdet #11021); the official code has no bound.
# official: AdamW lr 2e-4 (DINO's is 1e-4), weight decay 1e-4, clip 0.1,
# backbone lr x 0.1; 12 epochs, lr x 0.1 at epoch 11 (from the DINO base)
optim_wrapper = dict(optimizer=dict(lr=2e-4))
