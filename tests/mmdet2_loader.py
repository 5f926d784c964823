"""Import mmdet 2.x code here, beside mmcv 2 / mmengine, for reference runs.

Sense-X/Co-DETR (``../shared/reference/sense-x-co-detr``) is written for
mmdet 2.x and mmcv-full 1.x: its heads subclass mmdet 2's ``DETRHead`` and
``DeformableDetrTransformer``.  This module makes those importable in a
process of their own (never the test process: it takes the name
``mmdet``):

* mmdet 2.28.2's files come unmodified from its wheel (Apache-2.0, from
  PyPI, :func:`find_wheel`), extracted outside the repository; a meta-path
  finder serves ``mmdet.*`` from there without running the packages'
  ``__init__`` files (they import all of mmdet 2 and mmcv 1);
* the few mmcv 1 names these files use are given by mmcv 2 / mmengine
  (:func:`install_mmcv1_names`): registries, weight initialisers,
  ``force_fp32`` (a no-op: fp32 only), ``BaseModule``;
* :func:`install_mmdet2_names` fills the ``mmdet.core`` / ``mmdet.models``
  names that the reference imports from packages, from the real submodule
  files; ``AnchorFreeHead`` (of which ``DETRHead.__init__`` skips the
  ``__init__``) is a bare ``BaseModule``, and ``multi_apply`` /
  ``reduce_mean`` are their one-process definitions.
"""
import functools
import glob
import importlib.abc
import importlib.util
import os
import os.path as osp
import subprocess
import sys
import types
import zipfile

VERSION = '2.28.2'
SCOPE = 'mmdet2'
#: where the wheel is looked for (``$MMDET2_WHEEL`` first)
WHEEL_PLACES = ('../shared/wheelhouse', '~/.cache/detr_plus/wheels')


def find_wheel(download=False, repo_root=None):
    """Path of ``mmdet-2.28.2-py3-none-any.whl`` (None: not found); with
    ``download``, ``pip download`` it into the cache first."""
    if os.environ.get('MMDET2_WHEEL'):
        return os.environ['MMDET2_WHEEL']
    root = repo_root or osp.dirname(osp.dirname(osp.abspath(__file__)))
    places = [osp.expanduser(osp.join(root, p)) for p in WHEEL_PLACES]
    for place in places:
        found = glob.glob(osp.join(place, f'mmdet-{VERSION}-*.whl'))
        if found:
            return found[0]
    if download:
        os.makedirs(places[-1], exist_ok=True)
        done = subprocess.run([
            sys.executable, '-m', 'pip', 'download', f'mmdet=={VERSION}',
            '--no-deps', '-q', '-d', places[-1]
        ],
                              capture_output=True,
                              timeout=300)
        if done.returncode == 0:
            return find_wheel(repo_root=repo_root)
    return None


def extract(wheel, into):
    """The wheel's ``mmdet`` folder under ``into`` (extracted once)."""
    target = osp.join(into, 'mmdet2')
    if not osp.isdir(osp.join(target, 'mmdet')):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(
                target,
                [n for n in archive.namelist() if n.startswith('mmdet/')])
    return osp.join(target, 'mmdet')


class _BarePackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``mmdet`` and its sub-packages as empty packages over ``root``; its
    modules from their files; names in ``shims`` as given."""

    def __init__(self, root, shims):
        self.root, self.shims = root, shims

    def find_spec(self, name, path=None, target=None):
        if name != 'mmdet' and not name.startswith('mmdet.'):
            return None
        if name in self.shims:
            return importlib.util.spec_from_loader(name, self)
        parts = name.split('.')[1:]
        folder = osp.join(self.root, *parts)
        if osp.isdir(folder):
            spec = importlib.util.spec_from_loader(name, self, is_package=True)
            spec.submodule_search_locations = [folder]
            return spec
        return importlib.util.spec_from_file_location(name, folder + '.py')

    def create_module(self, spec):
        return self.shims.get(spec.name)

    def exec_module(self, module):
        if module.__name__ not in self.shims:
            module.__path__ = [
                osp.join(self.root,
                         *module.__name__.split('.')[1:])
            ]


def _module(name, **names):
    module = types.ModuleType(name)
    module.__dict__.update(names)
    return module


def force_fp32(*args, **kwargs):
    """mmcv 1's decorator, a no-op (everything here is fp32)."""
    if args and callable(args[0]):
        return args[0]
    return lambda function: function


def install_mmcv1_names():
    """The mmcv 1 names the reference files import, from mmcv 2 /
    mmengine."""
    import mmcv
    import mmcv.cnn
    import mmcv.cnn.bricks.transformer as bricks
    import mmcv.utils
    from mmengine.model import BaseModule, weight_init
    from mmengine.registry import MODELS, Registry, build_from_cfg
    from mmengine.utils import to_2tuple
    mmcv.jit = lambda **kwargs: (lambda function: function)
    for name in ('xavier_init', 'constant_init', 'normal_init',
                 'bias_init_with_prob', 'uniform_init'):
        setattr(mmcv.cnn, name, getattr(weight_init, name))
    # an explicit scope: inferred from the caller it would be 'mmdet', and
    # mmengine would import mmdet 3's register_all_modules
    mmcv.utils.Registry = functools.partial(Registry, scope=SCOPE)
    mmcv.utils.build_from_cfg = build_from_cfg
    mmcv.utils.to_2tuple = to_2tuple
    bricks.POSITIONAL_ENCODING = MODELS
    registry = _module(
        'mmcv.cnn.bricks.registry', **{
            name: MODELS
            for name in ('TRANSFORMER_LAYER', 'TRANSFORMER_LAYER_SEQUENCE',
                         'ATTENTION', 'FEEDFORWARD_NETWORK',
                         'POSITIONAL_ENCODING')
        })
    runner = _module(
        'mmcv.runner',
        force_fp32=force_fp32,
        auto_fp16=force_fp32,
        BaseModule=BaseModule)
    runner.base_module = _module(
        'mmcv.runner.base_module', BaseModule=BaseModule)
    sys.modules.update({
        'mmcv.cnn.bricks.registry': registry,
        'mmcv.runner': runner,
        'mmcv.runner.base_module': runner.base_module
    })


def multi_apply(func, *args, **kwargs):
    """mmdet 2's ``multi_apply``."""
    results = map(functools.partial(func, **kwargs), *args)
    return tuple(map(list, zip(*results)))


def reduce_mean(tensor):
    """mmdet 2's ``reduce_mean`` in one process: the tensor itself."""
    return tensor


def install_mmdet2_names(root):
    """Serve mmdet 2 from ``root`` and fill the package-level names."""
    from mmengine.model import BaseModule
    from mmengine.registry import Registry
    models = Registry('mmdet2 models', scope=SCOPE)
    shims = {
        'mmdet.models.builder':
        _module(
            'mmdet.models.builder',
            HEADS=models,
            LOSSES=models,
            DETECTORS=models,
            build_loss=models.build,
            build_head=models.build),
        'mmdet.models.dense_heads.anchor_free_head':
        _module(
            'mmdet.models.dense_heads.anchor_free_head',
            AnchorFreeHead=type('AnchorFreeHead', (BaseModule, ), {})),
        'mmdet.core.utils':
        _module(
            'mmdet.core.utils',
            multi_apply=multi_apply,
            reduce_mean=reduce_mean)
    }
    sys.modules.pop('mmdet', None)
    sys.meta_path.insert(0, _BarePackages(root, shims))
    core = importlib.import_module('mmdet.core')
    bbox = importlib.import_module('mmdet.core.bbox')
    transforms = importlib.import_module('mmdet.core.bbox.transforms')
    builder = importlib.import_module('mmdet.core.bbox.builder')
    iou = importlib.import_module(
        'mmdet.core.bbox.iou_calculators.iou2d_calculator')
    importlib.import_module('mmdet.core.bbox.iou_calculators').__dict__.update(
        bbox_overlaps=iou.bbox_overlaps)
    costs = importlib.import_module('mmdet.core.bbox.match_costs')
    costs.build_match_cost = importlib.import_module(
        'mmdet.core.bbox.match_costs.builder').build_match_cost
    importlib.import_module('mmdet.core.bbox.match_costs.match_cost')
    for name in ('assigners.hungarian_assigner', 'samplers.pseudo_sampler'):
        importlib.import_module(f'mmdet.core.bbox.{name}')
    names = dict(
        multi_apply=multi_apply,
        reduce_mean=reduce_mean,
        bbox_overlaps=iou.bbox_overlaps,
        build_assigner=builder.build_assigner,
        build_sampler=builder.build_sampler,
        bbox_mapping_back=transforms.bbox_mapping_back,
        merge_aug_proposals=None,  # test-time augmentation: not used
        **{
            n: getattr(transforms, n)
            for n in ('bbox_cxcywh_to_xyxy', 'bbox_xyxy_to_cxcywh')
        })
    core.__dict__.update(names)
    bbox.__dict__.update(names)
    for name in ('focal_loss', 'smooth_l1_loss', 'iou_loss'):
        importlib.import_module(f'mmdet.models.losses.{name}')
    utils = importlib.import_module('mmdet.models.utils')
    transformer = importlib.import_module('mmdet.models.utils.transformer')
    importlib.import_module('mmdet.models.utils.positional_encoding')
    utils.build_transformer = importlib.import_module(
        'mmdet.models.utils.builder').build_transformer
    utils.transformer = transformer
    return models


def load(wheel, workdir):
    """Make mmdet 2 importable; returns its model registry (heads,
    losses)."""
    install_mmcv1_names()
    return install_mmdet2_names(extract(wheel, workdir))
