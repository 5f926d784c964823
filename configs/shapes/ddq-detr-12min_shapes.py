# `make demo`'s recipe: DDQ-DETR with a cheaper step
# (ddq-detr-lean-tiny_shapes.py: distinct queries, NMS at IoU 0.8 before
# each decoder layer, the dense one-to-many branch; 2 decoder layers, fewer
# denoising and dense queries, fused AdamW) trained for 12 minutes of wall
# clock instead of a number of iterations, so that the demo, a fresh
# clone's install included, fits 15 minutes on a 2-core machine and a
# faster machine trains longer: TrainTimeBudgetHook times the first 20
# iterations, sets the run's length, its single evaluation at the end and
# the learning-rate drop at 90 %, and sets them again every 100 iterations.
# Why this recipe: the equal-wall-clock study (benchmarks/convergence.py
# --seconds 780, README "Quick start") ranked it first, ahead of DDQ-DETR
# as released, the two-stage Deformable DETR, DINO and Group-DINO; distinct
# queries remove the duplicates that cost a one-to-one model much of its
# early mAP, and the cheaper step buys 1.6x the iterations.
_base_ = ['./ddq-detr-lean-tiny_shapes.py']

max_iters = 100000  # an upper bound: the hook sets the length
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
# the base's param_scheduler (warm-up, one drop 10x): the hook moves the drop
# the checkpoint is saved at the last iteration (save_last)
default_hooks = dict(checkpoint=dict(interval=max_iters))
custom_hooks = [
    dict(type='RandomStateHook'),
    dict(type='NumClassCheckHook'),
    dict(type='TrainTimeBudgetHook', seconds=12 * 60),  # custom_hooks.2
    dict(type='NonFiniteGuardHook'),
]
