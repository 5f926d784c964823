# DDQ R-CNN, R50, 36 epochs with DETR augmentation on COCO: 48.1 AP in the
# authors' README, not measured here.  What differs from the 1x config, from
# jshilong/DDQ projects/configs/ddq_rcnn/ddq_rcnn_r50_3x.py:
_base_ = ['./ddq-rcnn_r50_1x_coco.py', '../ddq_fcn/detr_augmentation.py']

train_dataloader = dict(dataset=dict(pipeline={{_base_.detr_train_pipeline}}))
# gradient clip 10
optim_wrapper = dict(clip_grad=dict(max_norm=10, norm_type=2))
# 36 epochs, steps 27 / 33, warmup 2000 iterations from 1e-4 of the lr
# (full lr at iteration 2000, as mmcv 1.x: end=2001)
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-4, by_epoch=False, begin=0, end=2001),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]
