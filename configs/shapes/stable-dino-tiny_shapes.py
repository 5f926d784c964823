# Stable-DINO on the shapes data: the tiny DINO (2 encoder, 3 decoder
# layers) with the dense memory fusion of its encoder, the
# position-supervised classification loss (weight 6; denoising 1) and the
# position-modulated matching cost (beta 0.5); denoising negatives noised
# like the positives.
_base_ = ['./dino-tiny_shapes.py']

model = dict(
    encoder=dict(type='DenseFusionEncoder'),
    bbox_head=dict(
        loss_cls=dict(
            _delete_=True,
            type='PositionSupervisedLoss',
            alpha=0.25,
            gamma=2.0,
            ta_alpha=0.0,
            ta_beta=2.0,
            loss_weight=6.0)),
    dn_cfg=dict(negative_noise_offset=0.0, loss_cls_weight=1.0),
    train_cfg=dict(
        assigner=dict(match_costs=[
            dict(
                type='PositionModulatedFocalCost',
                weight=2.0,
                alpha=0.25,
                gamma=2.0,
                beta=0.5),
            dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
            dict(type='IoUCost', iou_mode='giou', weight=2.0)
        ])))
