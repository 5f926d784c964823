# H-DINO: DINO-4scale R50 12e plus H-DETR's hybrid matching branch with the
# official hyper-parameters: 1500 one-to-many queries, each ground truth
# repeated k = 6 times, loss weight 1.  The branch is dropped at inference.
# Our composition, not an official model (see HybridMatchingBranch): H-DETR's
# maintainers report that one-to-many matching conflicts with denoising
# (H-Deformable-DETR#16); the official H-DETR is
# h-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

model = dict(branches=[
    dict(
        type='HybridMatchingBranch',
        num_queries=1500,
        k_one_to_many=6,
        loss_weight=1.0)
])
