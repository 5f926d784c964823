"""mmengine's complexity analysis counts the MSDeformAttn op."""
import pytest
import torch
from mmengine.analysis import FlopAnalyzer

import projects_detr_plus  # noqa: F401  (registers the FLOP handle)
from projects_detr_plus.ops import multi_scale_deformable_attn


class OpOnly(torch.nn.Module):

    def forward(self, value, shapes, starts, locations, weights):
        return multi_scale_deformable_attn(value, shapes, starts, locations,
                                           weights)


def test_flop_handle_counts_the_op():
    bs, heads, dims, levels, points, queries = 2, 4, 8, 2, 3, 5
    shapes = torch.tensor([[6, 5], [3, 3]])
    starts = torch.tensor([0, 30])
    value = torch.randn(bs, 39, heads, dims)
    locations = torch.rand(bs, queries, heads, levels, points, 2)
    weights = torch.rand(bs, queries, heads, levels, points)
    analyzer = FlopAnalyzer(OpOnly(),
                            (value, shapes, starts, locations, weights))
    counted = analyzer.by_operator()
    expected = 5 * bs * queries * heads * levels * points * dims
    assert counted['ms_deform_attn'] == expected
    assert 'detr_plus::ms_deform_attn' not in analyzer.unsupported_ops()
    assert analyzer.total() == expected


def test_dino_module_flops_include_the_op():
    from detr_testing import build, dino_cfg, make_batch
    model = build(dino_cfg(dims=128, dn=False)).eval()
    inputs, samples = make_batch()
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples))
    # tensors out for the tracer: the head's outputs
    model.forward = lambda x: model._forward(x, data['data_samples'])
    analyzer = FlopAnalyzer(model, data['inputs'])
    by_op = analyzer.by_operator()
    assert by_op['ms_deform_attn'] > 0
    assert 'detr_plus::ms_deform_attn' not in analyzer.unsupported_ops()


@pytest.mark.parametrize('config',
                         ['ddq-fcn-tiny_shapes.py', 'ddq-rcnn-tiny_shapes.py'])
def test_ddq_dense_detectors_flops(config):
    """mmdet's get_flops path (``_forward`` traced by mmengine) works for
    DDQ FCN / R-CNN, and counts the head (DDQ R-CNN: more than DDQ FCN's
    conv head alone, for its Sparse R-CNN stages)."""
    import os.path as osp

    from mmengine.config import Config

    from conftest import REPO_ROOT
    from detr_testing import build, make_batch
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs/shapes', config))
    model = build(cfg.model).eval()
    inputs, samples = make_batch(size=128)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples))
    model.forward = lambda x: model._forward(x, data['data_samples'])
    by_module = FlopAnalyzer(model, data['inputs']).by_module()
    head = 'bbox_head' if 'fcn' in config else 'roi_head'
    assert by_module[head] > 0
    assert by_module[''] > by_module['backbone'] + by_module[head]
