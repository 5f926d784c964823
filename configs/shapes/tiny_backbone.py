# The from-scratch ResNet-18 (half width) + 4-level neck shared by the tiny
# shapes detectors; their configs add the transformer and head.
_base_ = ['./shapes_runtime.py']

model = dict(
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=32,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),  # trained from scratch: no pretrained weights here
    neck=dict(
        type='ChannelMapper',
        in_channels=[64, 128, 256],
        kernel_size=1,
        out_channels=128,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=32),
        num_outs=4))
