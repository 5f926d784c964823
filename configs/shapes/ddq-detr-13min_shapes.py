# `make demo`'s recipe: DDQ-DETR (ddq-detr-tiny_shapes.py: distinct queries,
# NMS at IoU 0.8 before each decoder layer, and the dense one-to-many branch)
# trained for 13 minutes of wall clock instead of a number of iterations, so
# that the demo fits 15 minutes on any 2-core machine: TrainTimeBudgetHook
# times the first 20 iterations, then sets the run's length, its single
# evaluation at the end and the learning-rate drop at 90 %.
# Why DDQ-DETR: in the equal-wall-clock study (benchmarks/convergence.py
# --seconds 780, README "Convergence") it beat DINO, Deformable DETR
# (two-stage) and Group-DINO; its distinct queries remove the duplicates that
# cost a one-to-one model most of its early mAP.
_base_ = ['./ddq-detr-tiny_shapes.py']

max_iters = 100000  # an upper bound: the hook sets the length
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters,
         milestones=[int(max_iters * 0.9)], gamma=0.1)
]
# the checkpoint is saved at the last iteration (save_last)
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='NumClassCheckHook'),
    dict(type='TrainTimeBudgetHook', seconds=13 * 60),
]
