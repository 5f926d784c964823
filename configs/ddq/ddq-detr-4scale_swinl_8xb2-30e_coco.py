# DDQ-DETR-4scale, Swin-L (ImageNet-22k, 384), 8x2 images, 30 epochs on COCO
# (58.7 AP in mmdet's metafile and the paper): mmdet's config with the DETR+
# detector and our MSDeformAttn op.  Same parameters and checkpoints as
# mmdet's DDQDETR.  Short of GPU memory: `--cfg-options
# model.backbone.with_cp=True` checkpoints the Swin activations (mmdet's DINO
# Swin-L config does; same results, slower steps).
_base_ = 'mmdet::ddq/ddq-detr-4scale_swinl_8xb2-30e_coco.py'

custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# checkpoints carry the random generators: resume continues the same run
custom_hooks = [dict(type='RandomStateHook'), dict(type='NonFiniteGuardHook')]

model = dict(
    type='DDQDETRPlus',
    # mmdet's self-attention mask for suppressed queries, so that mmdet's DDQ
    # checkpoints predict as in mmdet (see configs/ddq/ddq-detr-4scale_r50)
    suppressed_queries='mmdet',
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    decoder=dict(
        layer_cfg=dict(
            cross_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    bbox_head=dict(type='DDQHeadPlus', aux_num_pos=4),
    # at most 100 ground truths per image are denoised (mmdet #11021)
    dn_cfg=dict(max_targets=100),
    train_cfg=dict(assigner=dict(type='OneToOneAssigner')))
