# Group-DINO: DINO-4scale R50 12e plus Group DETR's K = 11 query groups, as
# the authors build Group DETR on two-stage detectors: 49.6 AP
# (PaddleDetection configs/group_detr/README.md) against 49.5 for
# PaddleDetection's DINO-4scale R50 12e (configs/dino/README.md, 49.5 since
# 2023-03-08).  Trained on 4 GPUs x 2 images ([README] "use 4GPU to train",
# [reader] batch_size: 2), at DINO's lr 1e-4.
# Sources, PaddlePaddle/PaddleDetection:
#   [yml] configs/group_detr/_base_/group_dino_r50.yml
#   [tr]  ppdet/modeling/transformers/group_detr_transformer.py
#   [hd]  ppdet/modeling/heads/detr_head.py (loss of each group / K)
#   [reader] configs/group_detr/_base_/dino_reader.yml
# Each extra group: 900 queries with its own encoder projection, class and box
# heads, top-900 anchors, encoder loss and denoising queries [tr]; groups see
# only themselves; decoder and its heads shared; all K groups weigh the same
# [hd].  Inference runs the first group only: a plain DINO, same cost.
# The rest (lr 1e-4, 12 epochs, 100 denoising queries, loss weights 1/5/2) is
# mmdet's DINO config, which equals [yml] and its optimizer_1x.yml.
_base_ = '../dino/dino-4scale_r50_8xb2-12e_coco.py'

model = dict(
    branches=[dict(type='GroupQueryBranch',
                   num_groups=11)],  # [yml] dual_groups: 10, + the first
    train_cfg=dict(assigner=dict(type='GroupOneToOneAssigner')))
# lr 1e-4 is for 4 x 2 images (mmdet's DINO: 8 x 2); --auto-scale-lr scales
# it for another total batch
auto_scale_lr = dict(base_batch_size=8)  # [README] 4 GPUs x [reader] 2
