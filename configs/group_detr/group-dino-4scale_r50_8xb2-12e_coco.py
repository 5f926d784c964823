# Group-DINO: DINO-4scale R50 12e plus Group DETR's K = 11 query groups
# (10 extra groups of 900 queries, self-attention inside each group, one-to-one
# matching per group, decoder weights shared).  Inference runs the first group
# only: the trained model is a plain DINO and costs the same.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

model = dict(
    branches=[dict(type='GroupQueryBranch', num_groups=11, loss_weight=1.0)],
    train_cfg=dict(assigner=dict(type='GroupOneToOneAssigner')))
