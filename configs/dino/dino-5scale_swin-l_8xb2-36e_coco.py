# DINO-5scale, Swin-L, 36 epochs (58.4 AP in mmdet's metafile): the 12-epoch
# config with mmdet's 36-epoch schedule (mmdet::dino/dino-5scale_swin-l_8xb2-
# 36e_coco.py).
_base_ = './dino-5scale_swin-l_8xb2-12e_coco.py'

max_epochs = 36
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[27, 33],
        gamma=0.1)
]
