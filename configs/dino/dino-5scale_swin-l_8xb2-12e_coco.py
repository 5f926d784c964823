# DINO-5scale, Swin-L (ImageNet-22k, 384), 8x2 images, 12 epochs on COCO
# (57.2 AP in mmdet's metafile): mmdet's config with the DETR+ detector on the
# query-branch architecture and our MSDeformAttn op.  Same parameters and
# checkpoints as mmdet's; the Swin backbone already trains with activation
# checkpointing (with_cp=True).
_base_ = 'mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py'

custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# checkpoints carry the random generators: resume continues the same run
custom_hooks = [dict(type='RandomStateHook'), dict(type='NonFiniteGuardHook')]

model = dict(
    type='DINOPlus',
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    decoder=dict(
        layer_cfg=dict(
            cross_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    # at most 100 ground truths per image are denoised (mmdet #11021)
    dn_cfg=dict(max_targets=100),
    train_cfg=dict(assigner=dict(type='OneToOneAssigner')))
