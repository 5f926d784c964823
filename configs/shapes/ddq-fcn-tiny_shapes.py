# DDQ FCN on the shapes data: the tiny backbone, an FPN P3-P7 (16x16 ... 1x1
# on a 128x128 image: 341 points, each a dense query) and the released DDQ
# FCN head at half width (128 channels, 32 shuffled per neighbour); distinct
# queries by class-agnostic NMS at IoU 0.7, at most 100 predictions.
# Optimiser as the released 1x config (AdamW 5e-5, wd 0.1) with the shapes
# batch of 4 (official: 16) and a 10x learning rate, as the tiny DETRs use.
_base_ = ['./tiny_backbone.py']

model = dict(
    type='DDQFCN',
    neck=dict(
        _delete_=True,
        type='FPN',
        in_channels=[64, 128, 256],
        out_channels=128,
        start_level=0,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='DDQFCNHead',
        num_classes=6,
        in_channels=128,
        feat_channels=128,
        shuffle_channels=32,
        strides=(8, 16, 32, 64, 128),
        dqs_cfg=dict(type='nms', iou_threshold=0.7, nms_pre=1000),
        num_distinct_queries=100,
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True)),
    train_cfg=None,
    test_cfg=None)

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=0.1),
    clip_grad=None)
