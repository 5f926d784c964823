# H-Deformable-DETR on the shapes data: the tiny two-stage Deformable DETR
# with mixed query selection and look forward twice
# (deformable-detr-refine-twostage-tiny_shapes.py) plus H-DETR's hybrid
# matching branch: ground truth repeated k = 6 times, weight 1.  A 128x128
# image gives 340 encoder tokens: 100 one-to-one + 200 one-to-many queries
# (the official 300 + 1500 need COCO-sized images).
_base_ = ['./deformable-detr-refine-twostage-tiny_shapes.py']

model = dict(branches=[
    dict(
        type='HybridMatchingBranch',
        num_queries=200,
        k_one_to_many=6,
        loss_weight=1.0)
])
