# Align-DETR on the shapes data: the tiny DINO (3 decoder layers) trained
# with IA-BCE and one-to-k matching (k = 2 on the encoder proposals and
# the first two layers, one-to-one on the last), rank weights tau = 1.5.
_base_ = ['./dino-tiny_shapes.py']

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
