# DDQ-DETR + Align-DETR on the shapes data: the tiny DDQ-DETR
# (ddq-detr-tiny_shapes.py: distinct queries, dense one-to-many branch)
# whose one-to-one supervision becomes Align-DETR's
# (align-detr-tiny_shapes.py): IA-BCE classification and one-to-k matching
# (k = 2 on the encoder proposals and the first two decoder layers,
# one-to-one on the last), rank weights tau = 1.5.
_base_ = ['./ddq-detr-tiny_shapes.py']

model = dict(
    bbox_head=dict(
        loss_cls=dict(
            _delete_=True,
            type='IABCELoss',
            alpha=0.25,
            gamma=2.0,
            loss_weight=1.0)),
    branches=[
        dict(type='AlignDETRBranch', match_numbers=(2, 2, 2, 1), tau=1.5)
    ])
