# Co-DINO on the shapes data: the tiny DINO plus Co-DETR's auxiliary ATSS and
# Faster R-CNN heads on the encoder output, whose positives become extra
# decoder queries.  Heads and queries are dropped at inference.
_base_ = ['./dino-tiny_shapes.py', './co_detr_aux_heads.py']

# the official recipe where it is not about COCO's scale: customized
# queries padded with negatives to at least 9 per image, QualityFocalLoss
# (beta 2) for the DETR losses, content queries N(0, 1), soft-NMS 0.8 at
# test (configs/co_detr/co-dino-5scale_r50_8xb2-12e_coco.py gives sources);
# the learning rate stays the tiny DINO's, to compare at equal settings
model = dict(
    content_init='normal',
    bbox_head=dict(
        type='DINOHeadPlus',
        reference_eps=1e-3,
        loss_cls=dict(
            _delete_=True,
            type='QualityFocalLoss',
            use_sigmoid=True,
            beta=2.0,
            loss_weight=1.0)),
    branches=[
        dict(
            type='CollaborativeBranch',
            name='co_rcnn',
            aux_head=_base_.rcnn_head,
            max_queries=300,
            min_queries=9),
        dict(
            type='CollaborativeBranch',
            name='co_atss',
            aux_head=_base_.atss_head,
            max_queries=300,
            min_queries=9),
    ],
    test_cfg=dict(nms=dict(type='soft_nms', iou_threshold=0.8)))
