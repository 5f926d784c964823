# Stable-DINO-4scale, R50, 12 epochs on COCO: DINO-4scale with stable
# matching and dense memory fusion (50.4 AP: the paper's abstract, arXiv
# 2304.04742, and the authors' README R50 table, an image;
# DINO-4scale 12e: 49.0).  Training changes: the position-supervised
# classification loss on every set (decoder layers, encoder proposals,
# denoising) and the position-modulated matching cost (decoder layers,
# encoder proposals); the model changes: the memory is the dense fusion of
# the encoder's input and of every encoder layer's output (inference too).
#
# "official: X" names the value's source in IDEA-Research/Stable-DINO
# projects/stabledino: [model] = configs/models/stabledino_r50.py,
# [dino] = modeling/dino.py, [12e] = configs/stabledino_r50_4scale_12ep.py.
# Everything not set here is our DINO-4scale R50 12e (mmdet's recipe: 900
# queries, denoising 100 / 0.5 / 1.0, matching costs 2 / 5 / 2, loss
# weights L1 5 / GIoU 2, AdamW 1e-4, backbone x0.1, clip 0.1, batch 16),
# which equals [model] / [12e] there; detrex's own baseline differs from
# mmdet's in backbone freezing and positional-encoding constants, which we
# keep as mmdet's.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

model = dict(
    # official: [model] encoder StableDINOTransformerEncoder,
    # multi_level_fusion="dense-fusion"
    encoder=dict(type='DenseFusionEncoder'),
    bbox_head=dict(
        loss_cls=dict(
            _delete_=True,
            type='PositionSupervisedLoss',
            alpha=0.25,  # official: [model] criterion alpha=0.25
            gamma=2.0,  # official: [model] criterion gamma=2.0
            ta_alpha=0.0,  # official: [model] criterion ta_alpha=0.0
            ta_beta=2.0,  # official: [model] criterion ta_beta=2.0
            # official: [model] weight_dict loss_class 6.0 (every layer and
            # the encoder: [dino] adds the '_enc' / '_{i}' keys)
            loss_weight=6.0)),
    dn_cfg=dict(
        # official: [model] neg_step_type='none' (no +1 on the negatives'
        # noise, [dino] prepare_for_cdn)
        negative_noise_offset=0.0,
        loss_cls_weight=1.0),  # official: [model] weight_dict loss_class_dn 1
    train_cfg=dict(
        assigner=dict(match_costs=[
            dict(
                type='PositionModulatedFocalCost',
                weight=2.0,  # official: [model] matcher cost_class=2.0
                alpha=0.25,  # official: [model] matcher alpha=0.25
                gamma=2.0,  # official: [model] matcher gamma=2.0
                beta=0.5),  # official: [model] matcher cec_beta=0.5
            # official: [model] matcher cost_bbox=5.0
            dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
            # official: [model] matcher cost_giou=2.0
            dict(type='IoUCost', iou_mode='giou', weight=2.0)
        ])))
