"""A Sense-X/Co-DETR Swin checkpoint loads into DETR+'s Co-DINO (mmdet's
``SwinTransformer``): the original Swin implementation's names are
converted, and the converted backbone computes what the authors' backbone
computes on the same image.

The authors' ``projects/models/swin_transformer.py``
(``../shared/reference/sense-x-co-detr``, unmodified) is imported with the
mmcv 1.x / mmdet 2.x / timm names it needs stubbed while it is imported
(``reference_stubs.module``); a small Swin (2 stages) of each
implementation, the authors' weights in an official-layout checkpoint."""
import importlib.util
import os.path as osp
import sys

import pytest
import torch
from mmdet.models.backbones import SwinTransformer
from mmengine.model import BaseModule

from conftest import REPO_ROOT
from projects_detr_plus.models.compat.co_detr_checkpoints import \
    convert_official_co_detr
from reference_stubs import module

SWIN = osp.join(
    osp.dirname(REPO_ROOT), 'shared', 'reference', 'sense-x-co-detr',
    'projects', 'models', 'swin_transformer.py')
needs_reference = pytest.mark.skipif(
    not osp.isfile(SWIN), reason=f'reference not found: {SWIN}')
ARCH = dict(embed_dims=32, depths=(2, 2), num_heads=(1, 2), window_size=7)


class _Registry:

    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def _drop_path(p=0.0):
    assert p == 0.0  # the test builds with drop_path_rate 0
    return torch.nn.Identity()


def _load_reference():
    """The module ``swin_transformer.py`` with its imports stubbed."""
    stubs = {
        'timm':
        module('timm', __path__=[]),
        'timm.models':
        module('timm.models', __path__=[]),
        'timm.models.layers':
        module(
            'timm.models.layers',
            DropPath=_drop_path,
            to_2tuple=lambda x: x if isinstance(x, tuple) else (x, x),
            trunc_normal_=torch.nn.init.trunc_normal_),
        'mmcv_custom':
        module('mmcv_custom', load_checkpoint=None),
        'mmdet.utils':
        module('mmdet.utils', get_root_logger=None),
        'mmdet.models.builder':
        module('mmdet.models.builder', BACKBONES=_Registry()),
        'mmcv.runner':
        module('mmcv.runner', BaseModule=BaseModule),
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location('sense_x_swin', SWIN)
        swin = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(swin)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = old
    return swin


class _Detector(torch.nn.Module):
    """The part of a detector the checkpoint hook looks at."""

    def __init__(self):
        super().__init__()
        self.backbone = SwinTransformer(
            embed_dims=ARCH['embed_dims'],
            depths=ARCH['depths'],
            num_heads=ARCH['num_heads'],
            window_size=ARCH['window_size'],
            strides=(4, 2),
            out_indices=(0, 1),
            drop_path_rate=0.0)
        # the one head weight of the test's checkpoint (official keys must
        # land on weights the detector has)
        branch = torch.nn.Module()
        branch.weight = torch.nn.Parameter(torch.zeros(1))
        self.bbox_head = torch.nn.Module()
        self.bbox_head.cls_branches = torch.nn.ModuleList([branch])


@needs_reference
def test_sense_x_swin_checkpoint_loads_and_computes_the_same():
    torch.manual_seed(0)
    theirs = _load_reference().SwinTransformerV1(
        embed_dim=ARCH['embed_dims'],
        depths=list(ARCH['depths']),
        num_heads=list(ARCH['num_heads']),
        window_size=ARCH['window_size'],
        drop_path_rate=0.0,
        out_indices=(0, 1))
    theirs.eval()  # their train() returns None
    with torch.no_grad():  # no two LayerNorms alike
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state_dict = {
        f'det.backbone.{k}': v
        for k, v in theirs.state_dict().items()
    }
    state_dict['det.query_head.cls_branches.0.weight'] = torch.zeros(1)
    assert any('.layers.0.downsample.reduction' in k for k in state_dict)

    ours = _Detector().eval()
    convert_official_co_detr(ours, state_dict, 'det.')
    backbone = {
        k[len('det.backbone.'):]: v
        for k, v in state_dict.items() if k.startswith('det.backbone.')
    }
    ours.backbone.load_state_dict(backbone, strict=True)
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for mine, expected in zip(ours.backbone(image), theirs(image)):
            torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
