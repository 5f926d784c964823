# DDQ-DETR-4scale, R50, 8x2 images, 12 epochs on COCO (51.3 AP in mmdet,
# 51.4 in the paper): mmdet's config with the DETR+ detector on the
# query-branch architecture and our MSDeformAttn op.  Same parameters and
# checkpoints as mmdet's DDQDETR.
_base_ = 'mmdet::ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py'

custom_imports = dict(
    imports=['projects_detr_plus'], allow_failed_imports=False)
# checkpoints carry the random generators: resume continues the same run
custom_hooks = [dict(type='RandomStateHook'), dict(type='NonFiniteGuardHook')]

model = dict(
    type='DDQDETRPlus',
    # mmdet's (and the official code's) self-attention mask for suppressed
    # queries, so that mmdet's DDQ checkpoints predict as in mmdet;
    # 'isolated' removes them from self-attention altogether
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
