"""Run mmcv's own MSDeformAttn test file against DETR+'s op.

    python tests/mmcv_msda_adapter.py PATH/test_ms_deformable_attn.py \
        [--mmcv-src mmcv-2.1.0.tar.gz] [pytest arguments]

mmcv 2.1.0's ``tests/test_ops/test_ms_deformable_attn.py`` imports
``MultiScaleDeformableAttention``, ``MultiScaleDeformableAttnFunction`` and
``multi_scale_deformable_attn_pytorch`` from
``mmcv.ops.multi_scale_deform_attn`` and ``IS_CUDA_AVAILABLE`` /
``IS_MLU_AVAILABLE`` from ``mmcv.utils``. In this process only, that
module is replaced so the file tests our op instead:

* ``MultiScaleDeformableAttnFunction.apply(value, shapes, starts, loc, attn,
  im2col_step)`` runs ``projects_detr_plus.ops.multi_scale_deformable_attn``
  (``im2col_step`` means nothing to ours; it must still be positive);
* ``multi_scale_deformable_attn_pytorch`` stays mmcv's reference: from the
  installed mmcv, else the function's source read from the mmcv sdist given
  with ``--mmcv-src`` (executed with torch alone);
* ``MultiScaleDeformableAttention`` is our
  ``MultiScaleDeformableAttentionPlus`` (it needs mmcv, mmengine and
  mmdet; where they are missing, the one test that builds the module fails
  its import and is reported as skipped with the reason).

Without mmcv installed (the GPU machine has torch alone) ``mmcv`` and
``mmcv.utils`` are stand-ins too. Exit status: pytest's.
"""
import ast
import importlib.util
import os.path as osp
import sys
import tarfile
import types

import pytest
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from projects_detr_plus import ops  # noqa: E402

MODULE = 'mmcv.ops.multi_scale_deform_attn'
REFERENCE = 'multi_scale_deformable_attn_pytorch'


class MultiScaleDeformableAttnFunction:
    """mmcv's autograd Function's ``apply``, on our op."""

    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights, im2col_step):
        if int(im2col_step) <= 0:
            raise ValueError(f'im2col_step must be positive, got '
                             f'{im2col_step}')
        return ops.multi_scale_deformable_attn(value, spatial_shapes,
                                               level_start_index,
                                               sampling_locations,
                                               attention_weights)


def reference_from_sdist(sdist):
    """mmcv's ``multi_scale_deformable_attn_pytorch``, read from the sdist."""
    with tarfile.open(sdist) as tar:
        member = next(
            m for m in tar.getmembers()
            if m.name.endswith('mmcv/ops/multi_scale_deform_attn.py'))
        source = tar.extractfile(member).read().decode()
    tree = ast.parse(source)
    func = next(
        node for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == REFERENCE)
    namespace = {'torch': torch, 'F': torch.nn.functional}
    exec(
        compile(
            ast.Module(body=[func], type_ignores=[]), f'{sdist}:{member.name}',
            'exec'), namespace)
    return namespace[REFERENCE]


def mmcv_reference(mmcv_src):
    """(function, where it came from)."""
    if importlib.util.find_spec('mmcv') is not None:
        try:
            from mmcv.ops import multi_scale_deform_attn as real
            return getattr(real,
                           REFERENCE), f'installed mmcv ({real.__file__})'
        except ImportError:
            pass
    if mmcv_src:
        return reference_from_sdist(mmcv_src), f'mmcv sdist {mmcv_src}'
    raise SystemExit('mmcv is not installed: pass --mmcv-src '
                     'mmcv-2.1.0.tar.gz for its reference implementation')


class _MissingModule:
    """Stands for MultiScaleDeformableAttentionPlus where mmdet is missing."""

    def __init__(self, reason):
        self.reason = reason

    def __call__(self, *args, **kwargs):
        pytest.skip(f'MultiScaleDeformableAttentionPlus needs {self.reason}')


def our_module():
    try:
        from projects_detr_plus.models.layers import \
            MultiScaleDeformableAttentionPlus
        return MultiScaleDeformableAttentionPlus
    except Exception as error:  # noqa: BLE001 - any failed import
        return _MissingModule(f'mmcv/mmengine/mmdet ({type(error).__name__}'
                              f': {error})')


def install(mmcv_src=None):
    """Put the adapter in place of mmcv's module; returns a description."""
    reference, origin = mmcv_reference(mmcv_src)
    if importlib.util.find_spec('mmcv') is None:
        for name in ('mmcv', 'mmcv.ops'):
            package = types.ModuleType(name)
            package.__path__ = []
            sys.modules[name] = package
        utils = types.ModuleType('mmcv.utils')
        utils.IS_CUDA_AVAILABLE = torch.cuda.is_available()
        utils.IS_MLU_AVAILABLE = False
        sys.modules['mmcv.utils'] = utils
    adapter = types.ModuleType(MODULE)
    adapter.MultiScaleDeformableAttnFunction = MultiScaleDeformableAttnFunction
    adapter.MultiScaleDeformableAttention = our_module()
    setattr(adapter, REFERENCE, reference)
    sys.modules[MODULE] = adapter
    return (
        f'op: projects_detr_plus ({ops.implementation_info()}); '
        f'reference: {origin}; module: '
        f'{getattr(adapter.MultiScaleDeformableAttention, "__name__", "-")}')


def main(argv):
    if not argv or argv[0].startswith('-'):
        raise SystemExit(__doc__)
    test_file, rest = argv[0], argv[1:]
    mmcv_src = None
    if '--mmcv-src' in rest:
        i = rest.index('--mmcv-src')
        mmcv_src = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    print(install(mmcv_src), flush=True)
    return pytest.main([
        test_file, '-p', 'no:cacheprovider', '--rootdir',
        osp.dirname(osp.abspath(test_file)), '-o', 'python_files=*.py'
    ] + rest)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
