# H-DINO on the shapes data: the tiny DINO plus a hybrid-matching branch.
# A 128x128 image gives 340 encoder tokens, so 100 main + 200 hybrid queries;
# k = 6 copies of each ground truth as in H-DETR.
_base_ = ['./dino-tiny_shapes.py']

model = dict(branches=[
    dict(
        type='HybridMatchingBranch',
        num_queries=200,
        k_one_to_many=6,
        loss_weight=1.0)
])
