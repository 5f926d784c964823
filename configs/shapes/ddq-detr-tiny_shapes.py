# DDQ-DETR on the shapes data: the tiny DINO with distinct queries (NMS at
# IoU 0.8 over the encoder proposals and before each decoder layer) and a
# dense one-to-many branch of 1.5 x 100 queries, 4 positives per object.
# A 128x128 image gives 340 encoder tokens.
_base_ = ['./dino-tiny_shapes.py']

model = dict(
    type='DDQDETRPlus',
    dense_topk_ratio=1.5,
    dqs_cfg=dict(type='nms', iou_threshold=0.8),
    suppressed_queries='isolated',
    bbox_head=dict(type='DDQHeadPlus', aux_num_pos=4))

# 1400 iterations (not the 2000 of the other shapes configs): a DDQ step
# costs about 1.5x a DINO step, and this fits the demo's 15 minutes on
# 2 CPU cores (`make demo DEMO_CONFIG=configs/shapes/ddq-detr-tiny_shapes.py`)
max_iters = 1400
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[int(max_iters * 0.9)],
        gamma=0.1)
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
