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
