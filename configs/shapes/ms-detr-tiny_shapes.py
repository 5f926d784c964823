# MS-DETR on the shapes data: the tiny Deformable-DETR++ (two-stage + box
# refinement with mixed query selection and look forward twice,
# deformable-detr-refine-twostage-tiny_shapes.py: H-Deformable-DETR's
# shapes config without its hybrid branch, the closest to the official
# MS-DETR++ baseline) plus MS-DETR's one-to-many supervision of its main
# queries on every decoder layer (k = 6, threshold 0.4, weights 2 / 5 / 2,
# own class heads, shared box heads) and MS-DETR's weights: one-to-one
# classification 1, encoder 2 / 5 / 2.  100 queries, 3 decoder layers.
_base_ = ['./deformable-detr-refine-twostage-tiny_shapes.py']

model = dict(
    bbox_head=dict(loss_cls=dict(loss_weight=1.0)),
    branches=[
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
            encoder_loss_weights=(2.0, 5.0, 2.0))
    ])
