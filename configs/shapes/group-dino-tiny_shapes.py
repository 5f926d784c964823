# Group-DINO on the shapes data: the tiny DINO plus Group DETR's extra query
# groups as its authors build them for two-stage detectors: each group has its
# own encoder heads, top-k anchors, encoder loss and denoising queries, and
# every group weighs the same in the loss.  K = 3 groups here (the paper uses
# 11: `--cfg-options model.branches.0.num_groups=11`).
_base_ = ['./dino-tiny_shapes.py']

model = dict(
    branches=[dict(type='GroupQueryBranch', num_groups=3)],
    train_cfg=dict(assigner=dict(type='GroupOneToOneAssigner')))
