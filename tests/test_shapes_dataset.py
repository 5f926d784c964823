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
