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
}


def _unscoped(node):
    """``node`` without the ``_scope_`` keys that `mmdet::` inheritance adds."""
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
    'group_detr/group-dino-4scale_r50_8xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['group']),
    'h_detr/h-dino-4scale_r50_8xb2-12e_coco.py':
    ('dino/dino-4scale_r50_8xb2-12e_coco.py', ['hybrid']),
    'co_detr/co-dino-5scale_r50_8xb2-12e_coco.py':
    (None, ['co_atss', 'co_rcnn']),
    'co_detr/co-dino-5scale_r50-fcos_8xb2-12e_coco.py':
    (None, ['co_atss', 'co_rcnn', 'co_fcos']),
}


def test_every_config_is_covered():
    shipped = {osp.relpath(p, osp.join(REPO_ROOT, 'configs'))
               for p in glob.glob(osp.join(REPO_ROOT, 'configs/*/*.py'))}
    coco = {p for p in shipped if not p.startswith('shapes/')}
    assert coco == set(COCO_PAIRS) | set(BRANCH_CONFIGS)


@pytest.mark.parametrize('ours', sorted(BRANCH_CONFIGS))
def test_branch_configs_extend_dino(ours):
    base, names = BRANCH_CONFIGS[ours]
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', ours))
    model = _build_model(cfg)
    assert [b.name for b in model.extra_branches] == names
    assert model.num_queries == 900
    if base is not None:
        dino = _shapes(_build_model(Config.fromfile(
            osp.join(REPO_ROOT, 'configs', base))))
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
    'co-dino-tiny_shapes.py', 'ddq-detr-tiny_shapes.py'])
def test_shapes_configs_build(name):
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes', name))
    model = _build_model(cfg)
    assert type(model).__module__.startswith('projects_detr_plus')
    assert cfg.train_cfg.type == 'IterBasedTrainLoop'
    assert cfg.model.bbox_head.num_classes == 6
