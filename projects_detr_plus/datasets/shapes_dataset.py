"""``ShapesDataset``: a (checked) ``CocoDataset`` over the generated shapes
data."""
import os.path as osp
import warnings

from mmdet.registry import DATASETS

from .checked_coco import CheckedCocoDataset
from .shapes_generator import (CLASSES, ShapesSpec, annotation_path,
                               generate_split, stored_spec)


def prepare_shapes(data_root, **spec_kwargs):
    """Generate a split under ``data_root`` unless it is there already.

    Returns the annotation file.  A split generated with other parameters is
    regenerated (with a warning) so a config change never reads stale data.
    """
    spec = ShapesSpec(**spec_kwargs)
    on_disk = stored_spec(data_root, spec.split)
    if on_disk != spec:
        if on_disk is not None:
            warnings.warn(f'{annotation_path(data_root, spec.split)} was made '
                          f'with {on_disk}; regenerating it with {spec}')
        generate_split(data_root, spec)
    return annotation_path(data_root, spec.split)


@DATASETS.register_module()
class ShapesDataset(CheckedCocoDataset):
    """The embedded synthetic shapes dataset, generated on first use.

    Args:
        data_root (str): cache folder of the generated data, e.g.
            ``'data/shapes/'`` (relative paths are relative to the cwd).
        split (str): ``'train'`` or ``'val'`` (any name works; the seed makes
            splits differ).
        num_images, image_size, seed, **: see :class:`ShapesSpec`.
        shapes_cfg (dict, optional): further :class:`ShapesSpec` fields
            (``classes`` other than the six: the dataset's metainfo follows
            them).
        **kwargs: passed to :class:`mmdet.datasets.CocoDataset`
            (``pipeline``, ``test_mode``, ``filter_cfg`` ...).  ``ann_file``
            and ``data_prefix`` are derived from the split.
    """

    METAINFO = dict(
        classes=CLASSES,
        palette=[(220, 20, 60), (0, 128, 255), (0, 200, 0), (255, 200, 0),
                 (160, 32, 240), (0, 200, 200)])

    @classmethod
    def metainfo_of(cls, classes):
        """Metainfo of a split of other ``classes`` (a palette colour per
        class, the shapes' in their order, then more)."""
        palette = cls.METAINFO['palette'] + [(255, 105, 180), (128, 64, 0)]
        return dict(classes=tuple(classes), palette=palette[:len(classes)])

    def __init__(self,
                 data_root='data/shapes/',
                 split='train',
                 num_images=2000,
                 image_size=128,
                 seed=0,
                 shapes_cfg=None,
                 **kwargs):
        for derived in ('ann_file', 'data_prefix'):
            if derived in kwargs:
                raise ValueError(f'ShapesDataset derives {derived!r} from '
                                 f'split={split!r}; do not set it')
        spec = dict(
            split=split,
            num_images=num_images,
            image_size=image_size,
            seed=seed,
            **(shapes_cfg or {}))
        self.shapes_spec = ShapesSpec(**spec)
        if 'metainfo' not in kwargs and self.shapes_spec.classes != CLASSES:
            kwargs['metainfo'] = self.metainfo_of(self.shapes_spec.classes)
        # Every DDP rank may generate: the files it writes are identical and
        # replaced atomically.
        ann_file = prepare_shapes(data_root, **spec)
        super().__init__(
            data_root=data_root,
            ann_file=osp.relpath(ann_file, data_root),
            data_prefix=dict(img=f'{split}/'),
            **kwargs)
