# Group-DINO on the shapes data: the tiny DINO plus K = 3 query groups
# (the paper uses 11; `--cfg-options model.branches.0.num_groups=11`).
_base_ = ['./dino-tiny_shapes.py']

model = dict(
    branches=[dict(type='GroupQueryBranch', num_groups=3, loss_weight=1.0)],
    train_cfg=dict(assigner=dict(type='GroupOneToOneAssigner')))
