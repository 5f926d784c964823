# DDQ FCN, R50, 36 epochs with DETR augmentation on COCO: 44.8 AP in the
# authors' README, not measured here.  What differs from the 1x config,
# from jshilong/DDQ projects/configs/ddq_fcn/ddq_fcn_r50_3x_detr_aug.py:
_base_ = ['./ddq-fcn_r50_1x_coco.py', './detr_augmentation.py']

train_dataloader = dict(dataset=dict(pipeline={{_base_.detr_train_pipeline}}))
# gradient clip 10
optim_wrapper = dict(clip_grad=dict(max_norm=10, norm_type=2))
# 36 epochs, steps 27 / 33 (warmup 500 iterations kept from schedule_1x)
max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=501),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]
