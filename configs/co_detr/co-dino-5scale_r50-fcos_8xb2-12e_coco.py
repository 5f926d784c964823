# Co-DINO-5scale R50 12e with an FCOS auxiliary head (the paper's third
# one-to-many head) next to Faster R-CNN and ATSS.  Not a reproduction: the
# official code has no FCOS head for Co-DINO; ours is mmdet's FCOSHead whose
# point becomes a query on a square of 8 strides centred on it.
_base_ = './co-dino-5scale_r50_8xb2-12e_coco.py'

fcos_head = dict(
    type='CoFCOSHead',
    in_channels=256,
    feat_channels=256,
    stacked_convs=1,
    strides=_base_.strides,
    regress_ranges=((-1, 32), (32, 64), (64, 128), (128, 256), (256, 512),
                    (512, 1e8)),
    center_sampling=True,
    center_sample_radius=1.5,
    norm_on_bbox=True,
    centerness_on_reg=True,
    prior_scale=8.0,
    loss_cls=dict(
        type='FocalLoss',
        use_sigmoid=True,
        gamma=2.0,
        alpha=0.25,
        loss_weight=1.0 * _base_.aux_weight),
    loss_bbox=dict(type='GIoULoss', loss_weight=2.0 * _base_.aux_weight),
    loss_centerness=dict(
        type='CrossEntropyLoss',
        use_sigmoid=True,
        loss_weight=1.0 * _base_.aux_weight))

model = dict(branches=[
    dict(_base_.co_query, name='co_rcnn', aux_head=_base_.rcnn_head),
    dict(_base_.co_query, name='co_atss', aux_head=_base_.atss_head),
    dict(_base_.co_query, name='co_fcos', aux_head=fcos_head),
])
