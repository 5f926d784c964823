# DINO-4scale, 36 epochs (50.9 AP reported).
_base_ = './dino-4scale_r50_8xb2-12e_coco.py'

max_epochs = 36
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[30],
        gamma=0.1)
]
