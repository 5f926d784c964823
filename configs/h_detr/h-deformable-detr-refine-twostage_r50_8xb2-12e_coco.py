# H-Deformable-DETR, R50, 8x2 images, 12 epochs on COCO: the official H-DETR
# (Jia et al., CVPR 2023; 48.7 AP in HDETR/H-Deformable-DETR's README).
# Deformable DETR + box refinement + two-stage with mixed query selection and
# look forward twice, and a hybrid branch of 1500 one-to-many queries
# (ground truth repeated k = 6 times, weight 1) dropped at inference.
#
# Official sources of the values below, in HDETR/H-Deformable-DETR:
#   [sh]   configs/two_stage/deformable-detr-hybrid-branch/12eps/
#          r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_
#          plus_iterative_bbox_refinement_plus_plus_two_stage.sh
#   [main] main.py's argparse defaults (the script does not override them)
# Everything not set here is mmdet's Deformable DETR refine + two-stage, which
# equals the official Deformable DETR ([main]: 4 levels, 6 + 6 layers,
# 8 heads, 4 points, costs 2/5/2, loss weights 2/5/2, focal alpha 0.25,
# lr_linear_proj_mult 0.1, lr_backbone 2e-5, clip 0.1, top 100 at test).
_base_ = ('../deformable_detr/'
          'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py')

num_one_to_many = 1500  # [sh] --num_queries_one2many 1500
ffn = dict(
    feedforward_channels=2048,  # [sh] --dim_feedforward 2048
    ffn_drop=0.0)  # [sh] --dropout 0.0
model = dict(
    num_queries=300,  # [sh] --num_queries_one2one 300
    mixed_selection=True,  # [sh] --mixed_selection
    encoder=dict(
        layer_cfg=dict(
            self_attn_cfg=dict(dropout=0.0),  # [sh] --dropout 0.0
            ffn_cfg=ffn)),
    decoder=dict(
        look_forward_twice=True,  # [sh] --look_forward_twice
        layer_cfg=dict(
            self_attn_cfg=dict(dropout=0.0),  # [sh] --dropout 0.0
            cross_attn_cfg=dict(dropout=0.0),  # [sh] --dropout 0.0
            ffn_cfg=ffn)),
    branches=[
        dict(
            type='HybridMatchingBranch',
            num_queries=num_one_to_many,
            k_one_to_many=6,  # [sh] --k_one2many 6
            loss_weight=1.0)  # [sh] --lambda_one2many 1.0
    ])

optim_wrapper = dict(
    optimizer=dict(
        lr=2e-4,  # [main] --lr 2e-4
        weight_decay=1e-4))  # [main] --weight_decay 1e-4

max_epochs = 12  # [sh] --epochs 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[11],  # [sh] --lr_drop 11
        gamma=0.1)
]
# 8 GPUs ([README]: run_dist_launch.sh 8) x 2 images ([main] --batch_size 2)
auto_scale_lr = dict(base_batch_size=16)
