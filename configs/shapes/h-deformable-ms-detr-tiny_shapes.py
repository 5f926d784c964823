# H-Deformable-DETR + MS-DETR on the shapes data: the tiny
# H-Deformable-DETR (h-deformable-detr-tiny_shapes.py: 100 one-to-one +
# 200 hybrid one-to-many queries) whose main queries also get MS-DETR's
# one-to-many supervision on every decoder layer (ms-detr-tiny_shapes.py:
# k = 6, threshold 0.4, weights 2 / 5 / 2, one-to-one classification 1,
# encoder 2 / 5 / 2).  The hybrid queries keep H-DETR's own losses.
_base_ = ['./ms-detr-tiny_shapes.py']

model = dict(branches=[
    dict(
        type='HybridMatchingBranch',
        num_queries=200,
        k_one_to_many=6,
        loss_weight=1.0),
    dict(
        type='MSDETRBranch',
        num_layers=3,
        assigner=dict(type='MSDETRAssigner', k=6, threshold=0.4),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),
        encoder_loss_weights=(2.0, 5.0, 2.0)),
])
