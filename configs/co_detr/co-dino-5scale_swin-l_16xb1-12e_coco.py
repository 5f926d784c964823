# Co-DINO-5scale, Swin-L (ImageNet-22k, 384), 16x1 images, 12 epochs on COCO
# (58.9 AP in Sense-X/Co-DETR's README, DETR augmentation): the R50 recipe
# with mmdet's projects/CO-DETR configs/codino/
# co_dino_5scale_swin_l_16xb1_1x_coco.py changes ("official" below).
_base_ = './co-dino-5scale_r50_8xb2-12e_coco.py'

pretrained = ('https://github.com/SwinTransformer/storage/releases/download/'
              'v1.0.0/swin_large_patch4_window12_384_22k.pth')  # official
model = dict(
    backbone=dict(
        _delete_=True,
        type='SwinTransformer',
        pretrain_img_size=384,
        embed_dims=192,
        depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48],
        window_size=12,
        mlp_ratio=4,
        qkv_bias=True,
        qk_scale=None,
        drop_rate=0.,
        attn_drop_rate=0.,
        drop_path_rate=0.3,  # official
        patch_norm=True,
        out_indices=(0, 1, 2, 3),
        # official: with_cp=False (the encoder checkpoints instead); set True
        # to fit 16 GB cards (Co-DETR#97, #121)
        with_cp=False,
        convert_weights=True,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[192, 384, 768, 1536]),  # official
    encoder=dict(num_cp=6))  # official: encoder with_cp=6

train_dataloader = dict(batch_size=1, num_workers=1)  # official, 16 GPUs
