# Deformable DETR, R50, 16x2 images, 50 epochs on COCO: mmdet's config with
# the DETR+ detector (same parameters and checkpoints, our MSDeformAttn op).
_base_ = 'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py'

custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# checkpoints carry the random generators: resume continues the same run
custom_hooks = [dict(type='RandomStateHook'), dict(type='NonFiniteGuardHook')]

model = dict(
    type='DeformableDETRPlus',
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    decoder=dict(
        layer_cfg=dict(
            cross_attn_cfg=dict(type='MultiScaleDeformableAttentionPlus'))),
    train_cfg=dict(assigner=dict(type='OneToOneAssigner')))
