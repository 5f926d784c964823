"""Importing the plugin registers into mmdet without any name collision."""
import subprocess
import sys
import textwrap

import pytest

# (registry name in mmdet.registry, a name this package must register there)
EXPECTED = [
    ('DATASETS', 'ShapesDataset'),
    ('DATASETS', 'CheckedCocoDataset'),
    ('MODELS', 'DINOPlus'),
    ('MODELS', 'DDQDETRPlus'),
    ('MODELS', 'DDQHeadPlus'),
    ('MODELS', 'DenseQueryBranch'),
    ('MODELS', 'DeformableDETRPlus'),
    ('MODELS', 'MultiScaleDeformableAttentionPlus'),
    ('MODELS', 'DeformableEncoderPlus'),
    ('MODELS', 'DeformableDecoderPlus'),
    ('MODELS', 'DinoDecoderPlus'),
    ('MODELS', 'DenoisingBranch'),
    ('MODELS', 'GroupQueryBranch'),
    ('MODELS', 'HybridMatchingBranch'),
    ('MODELS', 'CollaborativeBranch'),
    ('MODELS', 'AlignDETRBranch'),
    ('MODELS', 'IABCELoss'),
    ('MODELS', 'PositionSupervisedLoss'),
    ('MODELS', 'DenseFusionEncoder'),
    ('MODELS', 'MSDETRBranch'),
    ('MODELS', 'CoATSSHead'),
    ('MODELS', 'CoFCOSHead'),
    ('MODELS', 'CoRCNNHead'),
    ('MODELS', 'CoStandardRoIHead'),
    ('TASK_UTILS', 'OneToOneAssigner'),
    ('TASK_UTILS', 'GroupOneToOneAssigner'),
    ('TASK_UTILS', 'MSDETRAssigner'),
    ('TASK_UTILS', 'PositionModulatedFocalCost'),
    ('HOOKS', 'RandomStateHook'),
    ('OPTIM_WRAPPERS', 'CPUBF16AutocastOptimWrapper'),
]


def _ours(registry):
    return {
        name: cls
        for name, cls in registry.module_dict.items()
        if getattr(cls, '__module__', '').startswith('projects_detr_plus')
    }


def _all_registries():
    import mmdet.registry as mmdet_registry
    from mmengine.registry import Registry
    return {
        name: obj
        for name, obj in vars(mmdet_registry).items()
        if isinstance(obj, Registry)
    }


@pytest.mark.parametrize('registry_name,name', EXPECTED)
def test_import_adds_names_to_mmdet_registries(registry_name, name):
    import projects_detr_plus  # noqa: F401
    registry = _all_registries()[registry_name]
    assert registry.get(name) is not None
    assert name in _ours(registry), f'{name} must be ours, in mmdet scope'


def test_no_name_shadows_mmdet_mmcv_or_mmengine():
    """None of our names exists in mmdet's own registry or its parents."""
    import projects_detr_plus  # noqa: F401
    for registry_name, registry in _all_registries().items():
        for name in _ours(registry):
            parent = registry.parent
            while parent is not None:
                assert name not in parent.module_dict, \
                    f'{registry_name}.{name} shadows {parent.scope}'
                parent = parent.parent


def test_import_after_all_mmdet_modules_has_no_collision():
    """With every mmdet module registered first, our import raises nothing.

    mmengine raises KeyError on a duplicate name unless force=True, which
    this package never uses, so a clean import proves there is no collision
    with mmdet 3.3.0's names.
    """
    code = textwrap.dedent("""
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=True)
        import projects_detr_plus
        print('ok')
    """)
    proc = subprocess.run([sys.executable, '-c', code],
                          capture_output=True,
                          text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith('ok')


def test_source_never_forces_registration(repo_root):
    import pathlib
    for path in pathlib.Path(repo_root, 'projects_detr_plus').rglob('*.py'):
        assert 'force=True' not in path.read_text(), path
