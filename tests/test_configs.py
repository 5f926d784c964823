"""Every shipped config builds through mmdet's registry like mmdet's own."""
import copy
import glob
import os.path as osp

import pytest
from mmengine.config import Config

from conftest import REPO_ROOT

# our COCO config -> mmdet 3.3.0's config of the same model
COCO_PAIRS = {
    'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py':
    'deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
    'deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py':
    'deformable_detr/deformable-detr-refine_r50_16xb2-50e_coco.py',
    'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py':
    'deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
    'dino/dino-4scale_r50_8xb2-12e_coco.py':
    'dino/dino-4scale_r50_8xb2-12e_coco.py',
    'dino/dino-4scale_r50_8xb2-24e_coco.py':
    'dino/dino-4scale_r50_8xb2-24e_coco.py',
    'dino/dino-4scale_r50_8xb2-36e_coco.py':
    'dino/dino-4scale_r50_8xb2-36e_coco.py',
    'ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py':
    'ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py',
    'dino/dino-5scale_swin-l_8xb2-12e_coco.py':
    'dino/dino-5scale_swin-l_8xb2-12e_coco.py',
    'dino/dino-5scale_swin-l_8xb2-36e_coco.py':
    'dino/dino-5scale_swin-l_8xb2-36e_coco.py',
    'ddq/ddq-detr-4scale_swinl_8xb2-30e_coco.py':
    'ddq/ddq-detr-4scale_swinl_8xb2-30e_coco.py',
}


def _unscoped(node):
    """``node`` without the ``_scope_`` keys that `mmdet::` inheritance
    adds."""
    if isinstance(node, dict):
        return {k: _unscoped(v) for k, v in node.items() if k != '_scope_'}
    if isinstance(node, (list, tuple)):
        return [_unscoped(v) for v in node]
    return node


def _mmdet_config_path(relative):
    import mmdet
    return osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', relative)


def _build_model(cfg):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.init_cfg = None
    return MODELS.build(model_cfg)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# our COCO config with query branches -> (the DINO config it extends or
# None, the branch names it adds)
BRANCH_CONFIGS = {
    'group_detr/group-dino-4scale_r50_4xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['group']),
    'h_detr/h-dino-4scale_r50_8xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['hybrid']),
    'co_detr/co-dino-5scale_r50_8xb2-12e_coco.py': (None,
                                                    ['co_rcnn', 'co_atss']),
    'co_detr/co-dino-5scale_r50-fcos_8xb2-12e_coco.py':
    (None, ['co_rcnn', 'co_atss', 'co_fcos']),
    'align_detr/align-detr-4scale_r50_8xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['align']),
    'ms_detr/ms-dino-4scale_r50_8xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['o2m']),
}
# DDQ FCN / R-CNN (jshilong/DDQ, mmdet 2.22; no mmdet 3 config to compare
# with): 1x config -> its official values; 3x -> the 1x it extends
DDQ_DENSE_CONFIGS = {
    'ddq_fcn/ddq-fcn_r50_1x_coco.py': None,
    'ddq_fcn/ddq-fcn_r50_3x_coco.py': 'ddq_fcn/ddq-fcn_r50_1x_coco.py',
    'ddq_rcnn/ddq-rcnn_r50_1x_coco.py': None,
    'ddq_rcnn/ddq-rcnn_r50_3x_coco.py': 'ddq_rcnn/ddq-rcnn_r50_1x_coco.py',
}
DETR_AUGMENTATION = 'ddq_fcn/detr_augmentation.py'
H_DEFORMABLE_DETR = \
    'h_detr/h-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py'
MS_DETR_PP = 'ms_detr/ms-detr-pp_r50_8xb2-12e_coco.py'
FINETUNE_EXAMPLE = \
    'finetune/dino-4scale_r50_8xb2-12e_my-coco-format-dataset.py'


def test_every_config_is_covered():
    shipped = {
        osp.relpath(p, osp.join(REPO_ROOT, 'configs'))
        for p in glob.glob(osp.join(REPO_ROOT, 'configs/*/*.py'))
    }
    coco = {p for p in shipped if not p.startswith('shapes/')}
    assert coco == set(COCO_PAIRS) | set(BRANCH_CONFIGS) | {
        H_DEFORMABLE_DETR, FINETUNE_EXAMPLE, CO_DEFORMABLE_DETR, CO_DINO_SWIN_L
    } | set(DDQ_DENSE_CONFIGS) | {DETR_AUGMENTATION
                                  } | {STABLE_DINO, MS_DETR_PP}


def test_finetune_example_sets_classes_everywhere():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', FINETUNE_EXAMPLE))
    classes = cfg.metainfo['classes']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.metainfo['classes'] == classes
    assert cfg.model.test_cfg.score_thr == 0.0
    assert 'NumClassCheckHook' in [h.type for h in cfg.custom_hooks]
    model = _build_model(cfg)
    assert model.bbox_head.num_classes == len(classes)
    assert model.dn_query_generator.num_classes == len(classes)
    assert model.bbox_head.cls_branches[0].out_features == len(classes)


# resolved config key -> the official value (HDETR/H-Deformable-DETR, the
# r50 ... mqs_lft ... two_stage.sh script of 12 epochs and main.py)
H_DETR_OFFICIAL = {
    'model.num_queries': 300,  # --num_queries_one2one
    'model.branches.0.num_queries': 1500,  # --num_queries_one2many
    'model.branches.0.k_one_to_many': 6,  # --k_one2many
    'model.branches.0.loss_weight': 1.0,  # --lambda_one2many
    'model.mixed_selection': True,  # --mixed_selection
    'model.decoder.look_forward_twice': True,  # --look_forward_twice
    'model.with_box_refine': True,
    'model.as_two_stage': True,
    'model.num_feature_levels': 4,
    'model.encoder.num_layers': 6,
    'model.decoder.num_layers': 6,
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels': 2048,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels': 2048,
    'model.encoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,  # --dropout 0
    'model.decoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.encoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.cross_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.self_attn_cfg.num_heads': 8,
    'model.bbox_head.loss_cls.loss_weight': 2.0,  # cls_loss_coef
    'model.bbox_head.loss_cls.alpha': 0.25,  # focal_alpha
    'model.bbox_head.loss_bbox.loss_weight': 5.0,  # bbox_loss_coef
    'model.bbox_head.loss_iou.loss_weight': 2.0,  # giou_loss_coef
    'model.train_cfg.assigner.match_costs.0.weight': 2.0,  # set_cost_class
    'model.train_cfg.assigner.match_costs.1.weight': 5.0,  # set_cost_bbox
    'model.train_cfg.assigner.match_costs.2.weight': 2.0,  # set_cost_giou
    'model.test_cfg.max_per_img': 100,  # --topk 100
    'optim_wrapper.optimizer.type': 'AdamW',
    'optim_wrapper.optimizer.lr': 2e-4,  # --lr
    'optim_wrapper.optimizer.weight_decay': 1e-4,  # --weight_decay
    'optim_wrapper.clip_grad.max_norm': 0.1,  # --clip_max_norm
    'optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult': 0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.sampling_offsets.lr_mult': 0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.reference_points.lr_mult': 0.1,
    'train_cfg.max_epochs': 12,  # --epochs 12
    'param_scheduler.0.milestones': [11],  # --lr_drop 11
    'train_dataloader.batch_size': 2,  # --batch_size 2 (x 8 GPUs)
    'auto_scale_lr.base_batch_size': 16,
}

CO_DINO = 'co_detr/co-dino-5scale_r50_8xb2-12e_coco.py'
# resolved config key -> the official value (mmdet's projects/CO-DETR
# configs/codino/co_dino_5scale_r50_lsj_8xb2_1x_coco.py, which the non-LSJ
# co_dino_5scale_r50_8xb2_1x_coco.py inherits, and CoDINOHead's defaults)
CO_DINO_OFFICIAL = {
    'optim_wrapper.optimizer.type':
    'AdamW',
    'optim_wrapper.optimizer.lr':
    2e-4,
    'optim_wrapper.optimizer.weight_decay':
    1e-4,
    'optim_wrapper.clip_grad.max_norm':
    0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult':
    0.1,
    'train_cfg.max_epochs':
    12,
    'param_scheduler.0.milestones': [11],
    'train_dataloader.batch_size':
    2,
    'auto_scale_lr.base_batch_size':
    16,
    'model.num_queries':
    900,  # num_query
    'model.num_feature_levels':
    5,
    'model.neck.num_outs':
    5,
    'model.neck.norm_cfg.num_groups':
    32,
    'model.encoder.num_layers':
    6,
    'model.encoder.num_cp':
    4,  # encoder with_cp=4
    'model.decoder.num_layers':
    6,
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels':
    2048,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels':
    2048,
    'model.positional_encoding.temperature':
    20,
    'model.content_init':
    'normal',  # CoDinoTransformer.init_weights
    'model.dn_cfg.label_noise_scale':
    0.5,
    'model.dn_cfg.box_noise_scale':
    1.0,
    'model.dn_cfg.group_cfg.num_dn_queries':
    100,
    'model.bbox_head.loss_cls.type':
    'QualityFocalLoss',
    'model.bbox_head.loss_cls.beta':
    2.0,
    'model.bbox_head.loss_cls.loss_weight':
    1.0,
    'model.bbox_head.loss_bbox.loss_weight':
    5.0,
    'model.bbox_head.loss_iou.loss_weight':
    2.0,
    'model.bbox_head.sync_cls_avg_factor':
    True,  # Sense-X's config
    'model.train_cfg.assigner.match_costs.0.type':
    'FocalLossCost',
    'model.train_cfg.assigner.match_costs.0.weight':
    2.0,
    'model.train_cfg.assigner.match_costs.1.weight':
    5.0,
    'model.train_cfg.assigner.match_costs.2.weight':
    2.0,
    'model.test_cfg.max_per_img':
    300,
    'model.test_cfg.nms.type':
    'soft_nms',
    'model.test_cfg.nms.iou_threshold':
    0.8,
    # rpn_head, roi_head[0], train_cfg[1]
    'model.branches.0.aux_head.rpn_head.anchor_generator.octave_base_scale':
    4,
    'model.branches.0.aux_head.rpn_head.anchor_generator.scales_per_octave':
    3,
    'model.branches.0.aux_head.rpn_head.anchor_generator.ratios':
    [0.5, 1.0, 2.0],
    'model.branches.0.aux_head.rpn_head.anchor_generator.strides':
    [4, 8, 16, 32, 64, 128],
    'model.branches.0.aux_head.rpn_head.loss_cls.loss_weight':
    12.0,
    'model.branches.0.aux_head.rpn_head.loss_bbox.loss_weight':
    12.0,
    'model.branches.0.aux_head.roi_head.bbox_roi_extractor.featmap_strides':
    [4, 8, 16, 32, 64],
    'model.branches.0.aux_head.roi_head.bbox_head.loss_cls.loss_weight':
    12.0,
    'model.branches.0.aux_head.roi_head.bbox_head.loss_bbox.loss_weight':
    120.0,
    'model.branches.0.aux_head.train_cfg.rpn_proposal.nms_pre':
    4000,
    'model.branches.0.aux_head.train_cfg.rpn_proposal.max_per_img':
    1000,
    'model.branches.0.aux_head.train_cfg.rcnn.sampler.num':
    512,
    # bbox_head[0] (ATSS), train_cfg[2]
    'model.branches.1.aux_head.anchor_generator.octave_base_scale':
    8,
    'model.branches.1.aux_head.anchor_generator.strides':
    [4, 8, 16, 32, 64, 128],
    'model.branches.1.aux_head.loss_cls.loss_weight':
    12.0,
    'model.branches.1.aux_head.loss_bbox.loss_weight':
    24.0,
    'model.branches.1.aux_head.loss_centerness.loss_weight':
    12.0,
    'model.branches.1.aux_head.train_cfg.assigner.topk':
    9,
    # CoDINOHead: max_pos_coords=300, max(9, ...), use_zero_padding=False
    'model.branches.0.max_queries':
    300,
    'model.branches.1.max_queries':
    300,
    'model.branches.0.min_queries':
    9,
    'model.branches.1.min_queries':
    9,
    'model.branches.0.zero_padding':
    False,
    'model.branches.1.zero_padding':
    False,
    'model.branches.0.loss_weight':
    1.0,
    'model.branches.1.loss_weight':
    1.0,
}

CO_DINO_SWIN_L = 'co_detr/co-dino-5scale_swin-l_16xb1-12e_coco.py'
CO_DEFORMABLE_DETR = \
    'co_detr/co-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py'
# resolved config key -> the official value (Sense-X/Co-DETR
# projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py and
# CoDeformDETRHead / CoDeformableDetrTransformer defaults)
CO_DEFORMABLE_DETR_OFFICIAL = {
    'model.num_queries':
    300,
    'model.num_feature_levels':
    4,
    'model.with_box_refine':
    True,
    'model.as_two_stage':
    True,
    'model.mixed_selection':
    True,
    'model.decoder.look_forward_twice':
    True,
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels':
    2048,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels':
    2048,
    'model.encoder.layer_cfg.ffn_cfg.ffn_drop':
    0.0,
    'model.decoder.layer_cfg.ffn_cfg.ffn_drop':
    0.0,
    'model.encoder.layer_cfg.self_attn_cfg.dropout':
    0.0,
    'model.decoder.layer_cfg.self_attn_cfg.dropout':
    0.0,
    'model.decoder.layer_cfg.cross_attn_cfg.dropout':
    0.0,
    'model.positional_encoding.offset':
    -0.5,
    'model.bbox_head.sync_cls_avg_factor':
    True,
    'model.bbox_head.loss_cls.type':
    'FocalLoss',
    'model.bbox_head.loss_cls.loss_weight':
    2.0,
    'model.bbox_head.loss_bbox.loss_weight':
    5.0,
    'model.bbox_head.loss_iou.loss_weight':
    2.0,
    'model.test_cfg.max_per_img':
    100,
    'model.branches.0.name':
    'co_rcnn',
    'model.branches.1.name':
    'co_atss',
    'model.branches.0.aux_head.rpn_head.anchor_generator.strides':
    [8, 16, 32, 64, 128],
    'model.branches.0.aux_head.rpn_head.anchor_generator.scales_per_octave':
    3,
    'model.branches.0.aux_head.roi_head.bbox_roi_extractor.featmap_strides':
    [8, 16, 32, 64],
    'model.branches.0.aux_head.roi_head.bbox_roi_extractor.finest_scale':
    112,
    'model.branches.0.aux_head.roi_head.bbox_head.loss_bbox.loss_weight':
    120.0,
    'model.branches.1.aux_head.anchor_generator.strides': [8, 16, 32, 64, 128],
    'model.branches.1.aux_head.loss_bbox.loss_weight':
    24.0,
    'model.branches.0.own_query_pos':
    True,
    'model.branches.0.coord_feat':
    True,
    'model.branches.0.head_embedding':
    'scalar',
    'model.branches.1.head_embedding':
    'scalar',
    'model.branches.0.min_queries':
    9,
    'model.branches.0.max_queries':
    300,
    'model.branches.0.loss_weight':
    1.0,
    'optim_wrapper.optimizer.lr':
    2e-4,
    'optim_wrapper.optimizer.weight_decay':
    1e-4,
    'optim_wrapper.clip_grad.max_norm':
    0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult':
    0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.sampling_offsets.lr_mult':
    0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.reference_points.lr_mult':
    0.1,
    'train_cfg.max_epochs':
    12,
    'param_scheduler.0.milestones': [11],
    'train_dataloader.batch_size':
    2,
}


def _resolve(cfg, dotted):
    node = cfg
    for key in dotted.split('.'):
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


def test_co_dino_config_has_official_values():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', CO_DINO))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in CO_DINO_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    assert model.encoder_extra_level[0].stride == (2, 2)  # one, shared
    assert not any(hasattr(b, 'extra_level') for b in model.extra_branches)
    rpn = model.extra_branches[0].aux_head.rpn_head
    assert rpn.prior_generator.num_base_priors == [9] * 6


def test_co_dino_swin_l_is_the_r50_recipe_on_mmdet_dino_swin_l_backbone():
    """Official co_dino_5scale_swin_l_16xb1_1x_coco.py: the R50 Co-DINO
    with mmdet's Swin-L (as in mmdet's DINO Swin-L), encoder with_cp=6,
    1 image per GPU."""
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', CO_DINO_SWIN_L))
    r50 = Config.fromfile(osp.join(REPO_ROOT, 'configs', CO_DINO))
    assert cfg.model.encoder.num_cp == 6
    assert cfg.train_dataloader.batch_size == 1
    own = ('model.encoder.num_cp', 'train_dataloader.batch_size')
    for key in CO_DINO_OFFICIAL:
        if not key.startswith(own):
            assert _resolve(cfg, key) == _resolve(r50, key), key
    model = _build_model(cfg)
    dino = _build_model(
        Config.fromfile(
            osp.join(REPO_ROOT,
                     'configs/dino/dino-5scale_swin-l_8xb2-12e_coco.py')))
    ours = {
        k: v
        for k, v in _shapes(model).items()
        if k.startswith(('backbone.', 'neck.'))
    }
    assert ours == {
        k: v
        for k, v in _shapes(dino).items()
        if k.startswith(('backbone.', 'neck.'))
    }


def test_co_deformable_detr_config_has_official_values():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', CO_DEFORMABLE_DETR))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in CO_DEFORMABLE_DETR_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    assert type(model).__name__ == 'DeformableDETRPlus'
    rcnn, atss = model.extra_branches
    assert rcnn.content[0].out_features == 512  # aux_pos_trans: 2 x 256
    assert atss.head_embedding.shape == (1, )
    assert abs(atss.head_embedding.item()) <= 2**0.5  # xavier of (2, 1)
    assert rcnn.feat_proj[0].in_features == 256


# resolved config key -> the official value (IDEA-Research/detrex
# projects/align_detr: configs/aligndetr_k=2_r50_4scale_12ep.py and
# configs/models/aligndetr_r50.py)
ALIGN_DETR_OFFICIAL = {
    'model.bbox_head.loss_cls.type': 'IABCELoss',
    'model.bbox_head.loss_cls.alpha': 0.25,  # criterion alpha
    'model.bbox_head.loss_cls.gamma': 2.0,  # criterion gamma
    'model.bbox_head.loss_cls.loss_weight': 1.0,  # weight_dict loss_class
    'model.bbox_head.loss_bbox.loss_weight': 5.0,  # loss_bbox
    'model.bbox_head.loss_iou.loss_weight': 2.0,  # loss_giou
    'model.branches.0.match_numbers': (2, 2, 2, 2, 2, 2, 1),  # match_num
    'model.branches.0.tau': 1.5,  # tau
    'model.num_queries': 900,
    'model.dn_cfg.group_cfg.num_dn_queries': 100,  # dn_number
    'model.dn_cfg.label_noise_scale': 0.5,  # label_noise_ratio
    'model.dn_cfg.box_noise_scale': 1.0,  # box_noise_scale
    'model.train_cfg.assigner.match_costs.0.weight': 2.0,  # cost_class
    'model.train_cfg.assigner.match_costs.1.weight': 5.0,  # cost_bbox
    'model.train_cfg.assigner.match_costs.2.weight': 2.0,  # cost_giou
    'optim_wrapper.optimizer.lr': 1e-4,
    'optim_wrapper.optimizer.weight_decay': 1e-4,
    'optim_wrapper.clip_grad.max_norm': 0.1,
    'train_cfg.max_epochs': 12,
}


def test_align_detr_config_has_official_values():
    cfg = Config.fromfile(
        osp.join(REPO_ROOT, 'configs', 'align_detr',
                 'align-detr-4scale_r50_8xb2-12e_coco.py'))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in ALIGN_DETR_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong


STABLE_DINO = 'stable_dino/stable-dino-4scale_r50_8xb2-12e_coco.py'
# resolved config key -> the official value (IDEA-Research/Stable-DINO
# projects/stabledino: configs/models/stabledino_r50.py, modeling/dino.py,
# configs/stabledino_r50_4scale_12ep.py)
STABLE_DINO_OFFICIAL = {
    # encoder StableDINOTransformerEncoder, multi_level_fusion="dense-fusion"
    'model.encoder.type': 'DenseFusionEncoder',
    'model.encoder.num_layers': 6,
    'model.decoder.num_layers': 6,
    'model.num_queries': 900,
    'model.bbox_head.loss_cls.type': 'PositionSupervisedLoss',
    'model.bbox_head.loss_cls.alpha': 0.25,  # criterion alpha
    'model.bbox_head.loss_cls.gamma': 2.0,  # criterion gamma
    'model.bbox_head.loss_cls.ta_alpha': 0.0,  # criterion ta_alpha
    'model.bbox_head.loss_cls.ta_beta': 2.0,  # criterion ta_beta
    'model.bbox_head.loss_cls.loss_weight': 6.0,  # weight_dict loss_class
    'model.bbox_head.loss_bbox.loss_weight': 5.0,  # loss_bbox (and _dn)
    'model.bbox_head.loss_iou.loss_weight': 2.0,  # loss_giou (and _dn)
    'model.dn_cfg.loss_cls_weight': 1.0,  # weight_dict loss_class_dn
    'model.dn_cfg.negative_noise_offset': 0.0,  # neg_step_type='none'
    'model.dn_cfg.group_cfg.num_dn_queries': 100,  # dn_number
    'model.dn_cfg.label_noise_scale': 0.5,  # label_noise_ratio
    'model.dn_cfg.box_noise_scale': 1.0,  # box_noise_scale
    'model.train_cfg.assigner.match_costs.0.type':
    'PositionModulatedFocalCost',  # StableDINOHungarianMatcher
    'model.train_cfg.assigner.match_costs.0.weight': 2.0,  # cost_class
    'model.train_cfg.assigner.match_costs.0.alpha': 0.25,  # alpha
    'model.train_cfg.assigner.match_costs.0.gamma': 2.0,  # gamma
    'model.train_cfg.assigner.match_costs.0.beta': 0.5,  # cec_beta
    'model.train_cfg.assigner.match_costs.1.weight': 5.0,  # cost_bbox
    'model.train_cfg.assigner.match_costs.2.weight': 2.0,  # cost_giou
    'model.test_cfg.max_per_img': 300,  # select_box_nums_for_evaluation
    'optim_wrapper.optimizer.lr': 1e-4,
    'optim_wrapper.optimizer.weight_decay': 1e-4,
    'optim_wrapper.clip_grad.max_norm': 0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult': 0.1,
    'train_cfg.max_epochs': 12,  # max_iter 90000 at batch 16
}


def test_stable_dino_config_has_official_values():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', STABLE_DINO))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in STABLE_DINO_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    assert type(model.encoder).__name__ == 'DenseFusionEncoder'
    assert model.dn_query_generator.negative_noise_offset == 0.0
    dino = _shapes(
        _build_model(
            Config.fromfile(
                osp.join(REPO_ROOT, 'configs',
                         'dino/dino-4scale_r50_8xb2-12e_coco.py'))))
    ours = _shapes(model)
    assert {k: v for k, v in ours.items() if k in dino} == dino
    assert {
        k: v
        for k, v in ours.items() if k not in dino
    } == {
        'encoder.fusion_layer.0.weight': (256, 7 * 256),
        'encoder.fusion_layer.0.bias': (256, ),
        'encoder.fusion_layer.1.weight': (256, ),
        'encoder.fusion_layer.1.bias': (256, )
    }


# resolved config key -> the official value (Atten4Vis/MS-DETR: [pp900]
# scripts/train_ms_detr_pp_900.sh, [main] impl_a/main.py's argparse
# defaults, [detr] impl_a/models/deformable_detr.py, [o2m]
# impl_a/models/matcher_o2m.py)
MS_DETR_OFFICIAL = {
    'model.num_queries': 900,  # [pp900] --num_queries 900
    'model.mixed_selection': True,  # [pp900] --mixed_selection
    'model.decoder.look_forward_twice': True,  # [pp900] --look_forward_twice
    'model.with_box_refine': True,  # [pp900] --with_box_refine
    'model.as_two_stage': True,  # [pp900] --two_stage
    'model.num_feature_levels': 4,  # [main] --num_feature_levels
    'model.encoder.num_layers': 6,  # [main] --enc_layers
    'model.decoder.num_layers': 6,  # [main] --dec_layers
    'model.decoder.layer_cfg.self_attn_cfg.num_heads': 8,  # [main] --nheads
    # [pp900] --dim_feedforward 2048, --dropout 0.0
    'model.encoder.layer_cfg.ffn_cfg.feedforward_channels': 2048,
    'model.decoder.layer_cfg.ffn_cfg.feedforward_channels': 2048,
    'model.encoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.decoder.layer_cfg.ffn_cfg.ffn_drop': 0.0,
    'model.encoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.self_attn_cfg.dropout': 0.0,
    'model.decoder.layer_cfg.cross_attn_cfg.dropout': 0.0,
    'model.bbox_head.loss_cls.loss_weight': 1.0,  # [pp900] --cls_loss_coef
    'model.bbox_head.loss_cls.alpha': 0.25,  # [main] --focal_alpha
    'model.bbox_head.loss_bbox.loss_weight': 5.0,  # [main] --bbox_loss_coef
    'model.bbox_head.loss_iou.loss_weight': 2.0,  # [main] --giou_loss_coef
    'model.train_cfg.assigner.match_costs.0.weight': 2.0,  # set_cost_class
    'model.train_cfg.assigner.match_costs.1.weight': 5.0,  # set_cost_bbox
    'model.train_cfg.assigner.match_costs.2.weight': 2.0,  # set_cost_giou
    'model.test_cfg.max_per_img': 300,  # [pp900] --topk_eval 300
    'model.branches.0.type': 'MSDETRBranch',  # [pp900] --use_ms_detr
    'model.branches.0.num_layers': 6,  # [main] --dec_layers
    'model.branches.0.assigner.k': 6,  # [detr] o2m_matcher_k=6
    'model.branches.0.assigner.threshold': 0.4,  # o2m_matcher_threshold
    'model.branches.0.assigner.iou_weight': 0.7,  # [o2m] coef_box
    'model.branches.0.assigner.cls_weight': 0.3,  # [o2m] coef_cls
    'model.branches.0.assigner.positive_fraction': 0.25,  # [o2m]
    'model.branches.0.loss_cls.type': 'FocalLoss',  # [detr] loss_labels
    'model.branches.0.loss_cls.alpha': 0.25,  # [main] --focal_alpha
    'model.branches.0.loss_cls.gamma': 2.0,  # [detr] gamma=2
    'model.branches.0.loss_cls.loss_weight': 2.0,  # --o2m_cls_loss_coef
    'model.branches.0.loss_bbox.loss_weight': 5.0,  # --o2m_bbox_loss_coef
    'model.branches.0.loss_iou.loss_weight': 2.0,  # --o2m_giou_loss_coef
    # [pp900] --enc_cls_loss_coef 2 --enc_bbox_loss_coef 5
    # --enc_giou_loss_coef 2
    'model.branches.0.encoder_loss_weights': (2.0, 5.0, 2.0),
    'optim_wrapper.optimizer.type': 'AdamW',
    'optim_wrapper.optimizer.lr': 2e-4,  # [main] --lr
    'optim_wrapper.optimizer.weight_decay': 1e-4,  # [main] --weight_decay
    'optim_wrapper.clip_grad.max_norm': 0.1,  # [main] --clip_max_norm
    'optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult': 0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.sampling_offsets.lr_mult': 0.1,
    'optim_wrapper.paramwise_cfg.custom_keys.reference_points.lr_mult': 0.1,
    'train_cfg.max_epochs': 12,  # [pp900] --epochs 12
    'param_scheduler.0.milestones': [11],  # [pp900] --lr_drop 11
    'train_dataloader.batch_size': 2,  # [main] --batch_size 2 (x 8 GPUs)
    'auto_scale_lr.base_batch_size': 16,
}


def test_ms_detr_config_has_official_values():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', MS_DETR_PP))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in MS_DETR_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    assert type(model).__name__ == 'DeformableDETRPlus'
    assert [b.name for b in model.extra_branches] == ['o2m']
    # H-Deformable-DETR's model (FFN 2048, mixed selection) with 900
    # queries and, instead of the hybrid branch, 6 o2m class heads
    h_detr = _shapes(
        _build_model(
            Config.fromfile(osp.join(REPO_ROOT, 'configs',
                                     H_DEFORMABLE_DETR))))
    ours = _shapes(model)
    assert {k
            for k in h_detr
            if k not in ours} == {'extra_branches.0.content.weight'}
    assert {
        k: v
        for k, v in ours.items() if k not in h_detr
    } == {
        f'extra_branches.0.cls_branches.{i}.{p}':
        (80, 256) if p == 'weight' else (80, )
        for i in range(6)
        for p in ('weight', 'bias')
    }
    assert ours['query_embedding.weight'] == (900, 256)


def test_h_deformable_detr_config_has_official_values():
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', H_DEFORMABLE_DETR))
    wrong = {
        key: _resolve(cfg, key)
        for key, value in H_DETR_OFFICIAL.items()
        if _resolve(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    assert type(model).__name__ == 'DeformableDETRPlus'
    assert [b.name for b in model.extra_branches] == ['hybrid']
    assert model.decoder.look_forward_twice
    # mmdet's refine + two-stage model, plus the content table of the mixed
    # selection; FFN 2048 wide instead of 1024
    mmdet_model = _build_model(
        Config.fromfile(
            _mmdet_config_path(
                'deformable_detr/deformable-detr-refine-twostage_r50_'
                '16xb2-50e_coco.py')))
    ours, theirs = _shapes(model), _shapes(mmdet_model)
    added = {k for k in ours if k not in theirs}
    assert added == {
        'query_embedding.weight', 'extra_branches.0.content.'
        'weight'
    }
    assert ours['extra_branches.0.content.weight'] == (1500, 256)
    assert set(theirs) <= set(ours)
    widened = {k for k in theirs if ours[k] != theirs[k]}
    assert widened and all('ffn' in k for k in widened)


@pytest.mark.parametrize('ours', sorted(BRANCH_CONFIGS))
def test_branch_configs_extend_dino(ours):
    base, names = BRANCH_CONFIGS[ours]
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', ours))
    model = _build_model(cfg)
    assert [b.name for b in model.extra_branches] == names
    assert model.num_queries == 900
    if base is not None:
        dino = _shapes(
            _build_model(
                Config.fromfile(osp.join(REPO_ROOT, 'configs', base))))
        extended = _shapes(model)
        extra = {k for k in extended if k.startswith('extra_branches.')}
        assert {k: v for k, v in extended.items() if k not in extra} == dino
    else:  # Co-DINO: 5 feature levels
        assert model.num_feature_levels == 5


@pytest.mark.parametrize('ours,theirs', sorted(COCO_PAIRS.items()))
def test_coco_config_matches_mmdet(ours, theirs):
    our_cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', ours))
    mmdet_cfg = Config.fromfile(_mmdet_config_path(theirs))
    assert our_cfg.custom_imports.imports == ['projects_detr_plus']
    for key in ('train_cfg', 'param_scheduler', 'optim_wrapper',
                'train_pipeline'):
        assert _unscoped(our_cfg.get(key)) == _unscoped(mmdet_cfg.get(key)), \
            key
    ours_model, mmdet_model = _build_model(our_cfg), _build_model(mmdet_cfg)
    assert type(ours_model).__module__.startswith('projects_detr_plus')
    assert _shapes(ours_model) == _shapes(mmdet_model)


@pytest.mark.parametrize('name', [
    'dino-tiny_shapes.py', 'deformable-detr-tiny_shapes.py',
    'group-dino-tiny_shapes.py', 'h-dino-tiny_shapes.py',
    'co-dino-tiny_shapes.py', 'ddq-detr-tiny_shapes.py',
    'co-ddq-detr-tiny_shapes.py', 'ddq-detr-lean-tiny_shapes.py',
    'deformable-detr-refine-twostage-tiny_shapes.py',
    'h-deformable-detr-tiny_shapes.py', 'stable-dino-tiny_shapes.py',
    'align-detr-tiny_shapes.py', 'ms-detr-tiny_shapes.py'
])
def test_shapes_configs_build(name):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes', name))
    model = _build_model(cfg)
    assert type(model).__module__.startswith('projects_detr_plus')
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.model.bbox_head.num_classes == 6


# resolved key -> official value: jshilong/DDQ projects/configs/ddq_fcn/
# ddq_fcn_r50_1x.py and the DDQFCNHead defaults (ddq_fcn_head.py)
DDQ_FCN_OFFICIAL = {
    'model.neck.start_level': 1,
    'model.neck.num_outs': 5,
    'model.neck.add_extra_convs': 'on_input',
    'model.bbox_head.strides': [8, 16, 32, 64, 128],
    'model.bbox_head.dqs_cfg':
    dict(type='nms', iou_threshold=0.7, nms_pre=1000),
    'model.bbox_head.num_distinct_queries': 300,
    'model.bbox_head.shuffle_channels': 64,
    'model.bbox_head.norm_cfg':
    dict(type='GN', num_groups=32, requires_grad=True),
    'optim_wrapper.optimizer': dict(type='AdamW', lr=5e-5, weight_decay=0.1),
    'train_cfg.max_epochs': 12,
    'param_scheduler.0.end': 501,
    'param_scheduler.0.start_factor': 0.001,
    'param_scheduler.1.milestones': [8, 11],
    'train_dataloader.batch_size': 2,
}
# ... ddq_rcnn/ddq_rcnn_r50_1x.py, ddq_fcn_rpn.py
DDQ_RCNN_OFFICIAL = {
    'model.neck.start_level': 0,
    'model.neck.num_outs': 6,
    'model.rpn_start_level': 1,
    'model.rpn_head.num_distinct_queries': 300,
    'model.rpn_head.num_classes': 80,
    'model.roi_head.num_stages': 2,
    'model.roi_head.bbox_roi_extractor.featmap_strides':
    [4, 8, 16, 32, 64, 128],
    'model.roi_head.bbox_head.0.loss_cls.loss_weight': 2.0,
    'model.roi_head.bbox_head.0.loss_bbox.loss_weight': 5.0,
    'model.roi_head.bbox_head.0.loss_iou.loss_weight': 2.0,
    'model.roi_head.bbox_head.1.feedforward_channels': 2048,
    'model.test_cfg.rcnn.max_per_img': 300,
    'optim_wrapper.optimizer': dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    'param_scheduler.1.milestones': [8, 11],
}


def _unscoped_value(cfg, key):
    value = _resolve(cfg, key)
    return _unscoped(value.to_dict() if hasattr(value, 'to_dict') else value)


@pytest.mark.parametrize(
    'config,official',
    [('ddq_fcn/ddq-fcn_r50_1x_coco.py', DDQ_FCN_OFFICIAL),
     ('ddq_rcnn/ddq-rcnn_r50_1x_coco.py', DDQ_RCNN_OFFICIAL)])
def test_ddq_dense_configs_have_official_values(config, official):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    wrong = {
        key: _unscoped_value(cfg, key)
        for key, value in official.items()
        if _unscoped_value(cfg, key) != value
    }
    assert not wrong
    model = _build_model(cfg)
    head = getattr(model, 'bbox_head', None) or model.rpn_head
    assert head.num_classes == 80 and head.nms_pre == 1000
    assert head.main_loss.assigner.topk == 1
    assert head.aux_loss.assigner.topk == 8
    assert head.main_loss.loss_cls.beta == 2.0
    if hasattr(model, 'rpn_head'):
        assert tuple(model.rpn_head.compress.weight.shape) == (256, 512)
        assert model.rpn_head.num_classes == 80  # not mmdet's RPN 1


@pytest.mark.parametrize('config',
                         [c for c, base in DDQ_DENSE_CONFIGS.items() if base])
def test_ddq_dense_3x_is_the_1x_with_detr_augmentation(config):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    base = Config.fromfile(
        osp.join(REPO_ROOT, 'configs', DDQ_DENSE_CONFIGS[config]))
    assert _unscoped(cfg.model.to_dict()) == _unscoped(base.model.to_dict())
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=10, norm_type=2)
    assert cfg.train_cfg.max_epochs == 36
    assert cfg.param_scheduler[1].milestones == [27, 33]
    pipeline = cfg.train_dataloader.dataset.pipeline
    assert [t['type'] for t in pipeline][2:4] == ['RandomFlip', 'RandomChoice']


@pytest.mark.parametrize('name', [
    'ddq-fcn-tiny_shapes.py', 'ddq-rcnn-tiny_shapes.py', 'atss-tiny_shapes.py',
    'sparse-rcnn-tiny_shapes.py'
])
def test_dense_shapes_configs_build(name):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes', name))
    model = _build_model(cfg)
    head = getattr(model, 'bbox_head', None) or model.roi_head.bbox_head[-1]
    assert head.num_classes == 6
    ours = type(model).__name__ in ('DDQFCN', 'DDQRCNN')
    assert type(model).__module__.startswith('projects_detr_plus') == ours
