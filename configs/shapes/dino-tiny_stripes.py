# Fine-tuning the tiny DINO on a small dataset of another look: 100
# training and 100 val images of 3 classes, two of them (ring, arrow) never
# in the shapes data, on striped backgrounds (ShapesSpec's `classes` and
# `background`; generated into `data_root` on first use, pinned by seed).
# `benchmarks/finetune_study.py` fine-tunes it from a shapes-trained
# checkpoint against the same model from scratch, for DINO, DDQ-DETR and
# Co-DINO (it applies this file's data and class count to their configs).
#
#   python tools/train.py configs/shapes/dino-tiny_stripes.py \
#       --cfg-options load_from=work_dirs/dino-tiny_shapes/iter_2000.pth
#
# `load_from` a 6-class shapes checkpoint: the class-dependent weights keep
# their initialisation (logged), everything else loads.
_base_ = ['./dino-tiny_shapes.py']

data_root = 'data/shapes_stripes/'
stripes = dict(classes=('triangle', 'ring', 'arrow'), background='stripes')
train_dataloader = dict(
    dataset=dict(
        data_root=data_root, num_images=100, seed=10, shapes_cfg=stripes))
val_dataloader = dict(
    dataset=dict(
        data_root=data_root, num_images=100, seed=11, shapes_cfg=stripes))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

model = dict(bbox_head=dict(num_classes=3))

# 500 iterations (20 epochs of 100 images at batch 4), LR drop at 90 %
max_iters = 500
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[int(max_iters * 0.9)],
        gamma=0.1)
]
default_hooks = dict(checkpoint=dict(interval=max_iters))
