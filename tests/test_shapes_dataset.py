"""The embedded shapes dataset: deterministic, valid COCO, a fair task."""
import hashlib
import json
import os
import os.path as osp

import numpy as np
import pytest
from pycocotools.coco import COCO

from projects_detr_plus.datasets import (CLASSES, ShapesDataset, ShapesSpec,
                                         generate_split, prepare_shapes)


def _digest(root):
    """sha256 over every file below ``root`` (names and bytes)."""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = osp.join(folder, name)
            digest.update(osp.relpath(path, root).encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope='module')
def val_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    spec = ShapesSpec(split='val', num_images=60, image_size=128, seed=1)
    return root, spec, generate_split(root, spec)


def test_same_seed_same_bytes(tmp_path):
    spec = ShapesSpec(split='train', num_images=12, seed=3)
    generate_split(str(tmp_path / 'a'), spec)
    generate_split(str(tmp_path / 'b'), spec)
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')


def test_different_seeds_differ(tmp_path):
    generate_split(str(tmp_path / 'a'), ShapesSpec(num_images=4, seed=0))
    generate_split(str(tmp_path / 'b'), ShapesSpec(num_images=4, seed=1))
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'b')


def test_annotations_are_valid_coco(val_split):
    root, spec, ann_file = val_split
    coco = COCO(ann_file)
    assert len(coco.getImgIds()) == spec.num_images
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
        list(CLASSES)
    for ann in coco.loadAnns(coco.getAnnIds()):
        x, y, w, h = ann['bbox']
        image = coco.loadImgs(ann['image_id'])[0]
        assert w > 0 and h > 0
        assert x >= 0 and y >= 0
        assert x + w <= image['width'] and y + h <= image['height']
        assert 0 < ann['area'] <= w * h
        assert osp.isfile(osp.join(root, 'val', image['file_name']))


def test_task_is_not_a_toy(val_split):
    _, spec, ann_file = val_split
    coco = COCO(ann_file)
    counts = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(counts) >= 1 and max(counts) <= 20
    assert max(counts) >= 10, 'crowded images must occur'
    present = {ann['category_id'] for ann in coco.loadAnns(coco.getAnnIds())}
    assert present == set(range(1, len(CLASSES) + 1)), 'every class appears'
    sides = np.array(
        [max(a['bbox'][2:]) for a in coco.loadAnns(coco.getAnnIds())])
    assert sides.min() <= 12, 'small objects (about 8 px) must occur'
    assert sides.max() >= 0.5 * spec.image_size, 'large objects must occur'
    boxes = [a['bbox'] for a in coco.loadAnns(coco.getAnnIds())]
    assert _overlapping_pairs(coco) > 0, 'objects must overlap / occlude'
    assert len(boxes) >= 5 * spec.num_images // 2


def _overlapping_pairs(coco):
    pairs = 0
    for image_id in coco.getImgIds():
        boxes = np.array([
            a['bbox'] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        ],
                         dtype=float)
        x1, y1 = boxes[:, 0], boxes[:, 1]
        x2, y2 = x1 + boxes[:, 2], y1 + boxes[:, 3]
        iw = np.minimum(x2[:, None], x2) - np.maximum(x1[:, None], x1)
        ih = np.minimum(y2[:, None], y2) - np.maximum(y1[:, None], y1)
        inter = (iw > 0) & (ih > 0)
        pairs += int(inter.sum() - len(boxes)) // 2
    return pairs


def test_background_is_textured_and_noisy(val_split):
    import cv2
    root, _, _ = val_split
    image = cv2.imread(osp.join(root, 'val', '000001.png')).astype(float)
    # neighbouring pixels differ: noise, not flat colour
    assert np.abs(np.diff(image, axis=1)).mean() > 2.0


def test_prepare_regenerates_on_changed_spec(tmp_path):
    root = str(tmp_path)
    ann = prepare_shapes(root, split='val', num_images=3, seed=5)
    assert len(json.load(open(ann))['images']) == 3
    with pytest.warns(UserWarning, match='regenerating'):
        prepare_shapes(root, split='val', num_images=5, seed=5)
    assert len(json.load(open(ann))['images']) == 5
    mtime = os.stat(ann).st_mtime_ns
    prepare_shapes(root, split='val', num_images=5, seed=5)  # cached
    assert os.stat(ann).st_mtime_ns == mtime


def test_registered_dataset_loads_through_mmdet(tmp_path):
    from mmdet.registry import DATASETS
    dataset = DATASETS.build(
        dict(
            type='ShapesDataset',
            data_root=str(tmp_path),
            split='train',
            num_images=6,
            seed=2,
            pipeline=[]))
    assert isinstance(dataset, ShapesDataset)
    assert len(dataset) == 6
    assert dataset.metainfo['classes'] == CLASSES
    item = dataset[0]
    assert osp.isfile(item['img_path'])
    assert all(0 <= inst['bbox_label'] < len(CLASSES)
               for inst in item['instances'])


def test_dataset_rejects_derived_paths(tmp_path):
    with pytest.raises(ValueError, match='ann_file'):
        ShapesDataset(data_root=str(tmp_path), ann_file='x.json', num_images=1)


def _content_digest(root, split):
    """sha256 of a split's images (decoded pixels, not PNG bytes) and its
    images / annotations / categories lists."""
    import cv2
    digest = hashlib.sha256()
    with open(osp.join(root, 'annotations', f'instances_{split}.json')) as f:
        coco = json.load(f)
    for key in ('images', 'annotations', 'categories'):
        digest.update(json.dumps(coco[key], sort_keys=True).encode())
    for image in coco['images']:
        digest.update(
            cv2.imread(osp.join(root, split, image['file_name'])).tobytes())
    return digest.hexdigest()


#: the shapes val split of every config (200 images, seed 1): the project's
#: yardstick, whose content must never change
YARDSTICK_DIGEST = \
    'd651966b6372180fd6dbbac18ef23b250ec7a92bd3aa23800fdf81048cffa200'


def test_the_yardstick_val_split_never_changes(tmp_path):
    spec = ShapesSpec(split='val', num_images=200, image_size=128, seed=1)
    generate_split(str(tmp_path), spec)
    assert _content_digest(str(tmp_path), 'val') == YARDSTICK_DIGEST
    stored = json.load(open(tmp_path / 'annotations/instances_val.json'))
    assert 'classes' not in stored['info']['spec']  # later fields: unset


@pytest.fixture(scope='module')
def stripes_split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('stripes'))
    spec = ShapesSpec(
        split='train',
        num_images=40,
        seed=10,
        classes=('triangle', 'ring', 'arrow'),
        background='stripes')
    return root, spec, generate_split(root, spec)


def test_another_look_has_its_classes_and_new_shapes(stripes_split):
    from projects_detr_plus.datasets.shapes_generator import stored_spec
    root, spec, ann_file = stripes_split
    coco = COCO(ann_file)
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
        ['triangle', 'ring', 'arrow']
    anns = coco.loadAnns(coco.getAnnIds())
    assert {a['category_id'] for a in anns} == {1, 2, 3}
    # a ring's hole: its pixels fill less of its box than a disc would
    # (pi / 4 = 0.785 of the box; a ring of inner radius 0.55, 0.55)
    fill = [
        a['area'] / (a['bbox'][2] * a['bbox'][3]) for a in anns
        if a['category_id'] == 2 and min(a['bbox'][2:]) >= 24
    ]
    assert fill and np.median(fill) < 0.65
    assert stored_spec(root, 'train') == spec


def _band_energy(gray, low=5, high=30):
    """Share of an image's spectral energy (DC left out) at 5-30 cycles
    per image: stripes of period 5-20 px on 128 px put theirs there, the
    textured background (a 4x4 grid upsampled) below."""
    power = np.abs(np.fft.fft2(gray - gray.mean()))**2
    k = np.fft.fftfreq(gray.shape[0]) * gray.shape[0]
    radius = np.hypot(k[:, None], k[None, :])
    return power[(radius >= low)
                 & (radius <= high)].sum() / power[radius > 0].sum()


def test_another_look_has_striped_backgrounds():
    from projects_detr_plus.datasets.shapes_generator import (
        _background, _striped_background)
    rng = np.random.default_rng(0)
    stripes = [
        _band_energy(_striped_background(rng, 128).mean(2)) for _ in range(8)
    ]
    textured = [_band_energy(_background(rng, 128).mean(2)) for _ in range(8)]
    assert min(stripes) > 0.1 > max(textured)


def test_unknown_classes_and_backgrounds_are_refused():
    with pytest.raises(ValueError, match='classes must be some of'):
        ShapesSpec(classes=('circle', 'blob'))
    with pytest.raises(ValueError, match='background must be one of'):
        ShapesSpec(background='plain')


def test_dataset_metainfo_follows_the_classes(tmp_path):
    from mmdet.registry import DATASETS
    dataset = DATASETS.build(
        dict(
            type='ShapesDataset',
            data_root=str(tmp_path),
            split='train',
            num_images=4,
            seed=2,
            shapes_cfg=dict(classes=['ring', 'arrow'], background='stripes'),
            pipeline=[]))
    assert dataset.metainfo['classes'] == ('ring', 'arrow')
    assert len(dataset.metainfo['palette']) == 2
    labels = {i['bbox_label'] for d in dataset for i in d['instances']}
    assert labels <= {0, 1}
