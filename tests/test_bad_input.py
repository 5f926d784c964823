"""Bad data and configs fail early with an error naming the image and the
problem, or are handled correctly (the op's bad inputs and the missing
extension are covered in test_msda_op.py)."""
import json
import os.path as osp
import subprocess
import sys

import mmcv
import numpy as np
import pytest

from conftest import REPO_ROOT

CATEGORIES = [
    dict(id=1, name='circle'),
    dict(id=2, name='square'),
    dict(id=7, name='star')
]


def _coco(tmp_path, annotations, images=('a.png', 'b.png')):
    """A two-image COCO file whose images are real 40x30 PNGs."""
    (tmp_path / 'img').mkdir(exist_ok=True)
    for name in images:
        mmcv.imwrite(
            np.full((30, 40, 3), 128, np.uint8), str(tmp_path / 'img' / name))
    data = dict(
        images=[
            dict(id=i + 1, file_name=name, width=40, height=30)
            for i, name in enumerate(images)
        ],
        annotations=[
            dict(dict(id=i + 1, image_id=1, iscrowd=0, area=100.0), **ann)
            for i, ann in enumerate(annotations)
        ],
        categories=CATEGORIES)
    path = tmp_path / 'ann.json'
    path.write_text(json.dumps(data))
    return path


def _dataset(tmp_path, annotations, **kwargs):
    from mmdet.utils import register_all_modules
    register_all_modules()
    from projects_detr_plus.datasets import CheckedCocoDataset
    kwargs.setdefault('metainfo', dict(classes=('circle', 'square', 'star')))
    return CheckedCocoDataset(
        ann_file=str(_coco(tmp_path, annotations)),
        data_prefix=dict(img=str(tmp_path / 'img') + '/'),
        filter_cfg=dict(filter_empty_gt=False),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='PackDetInputs')
        ],
        **kwargs)


@pytest.mark.parametrize('bbox,problem', [
    ([1.0, float('nan'), 5.0, 5.0], 'NaN/inf'),
    ([1.0, 2.0, float('inf'), 5.0], 'NaN/inf'),
    ([1.0, 2.0, 3.0], r'must be \[x, y, w, h\]'),
    (None, r'must be \[x, y, w, h\]'),
])
def test_broken_box_names_image_and_annotation(tmp_path, bbox, problem):
    anns = [
        dict(bbox=[2, 2, 5, 5], category_id=1),
        dict(bbox=bbox, category_id=2)
    ]
    with pytest.raises(ValueError, match=problem) as error:
        _dataset(tmp_path, anns)
    assert 'a.png (image id 1, annotation id 2)' in str(error.value)


def test_unknown_category_id_is_an_error(tmp_path):
    anns = [dict(bbox=[2, 2, 5, 5], category_id=99)]
    with pytest.raises(
            ValueError,
            match=r'category_id 99 is not a category'
            r'.*ids: \[1, 2, 7\]') as error:
        _dataset(tmp_path, anns)
    assert 'a.png' in str(error.value)


def test_categories_left_out_by_the_config_are_skipped(tmp_path):
    anns = [
        dict(bbox=[2, 2, 5, 5], category_id=1),
        dict(bbox=[3, 3, 5, 5], category_id=7)
    ]
    dataset = _dataset(
        tmp_path, anns, metainfo=dict(classes=('circle', 'square')))
    labels = [i['bbox_label'] for i in dataset.get_data_info(0)['instances']]
    assert labels == [0]


def test_degenerate_and_outside_boxes_are_dropped_or_clipped(tmp_path):
    anns = [
        dict(bbox=[2, 2, 5, 5], category_id=1),  # kept as is
        dict(bbox=[5, 5, 0, 4], category_id=1),  # zero width
        dict(bbox=[5, 5, -3, 4], category_id=1),  # negative
        dict(bbox=[50, 5, 10, 10], category_id=1),  # right of image
        dict(bbox=[-5, 20, 20, 20], category_id=2)
    ]  # sticks out
    with pytest.warns(UserWarning, match='clipped 1 boxes .* dropped 3'):
        dataset = _dataset(tmp_path, anns)
    boxes = [i['bbox'] for i in dataset.get_data_info(0)['instances']]
    assert boxes == [[2, 2, 7, 7], [0, 20, 15, 30]]
    sample = dataset[0]['data_samples']
    assert sample.gt_instances.bboxes.shape == (2, 4)
    assert (sample.gt_instances.bboxes.tensor[:, 2:]
            <= sample.gt_instances.bboxes.tensor.new_tensor([40, 30])).all()


def test_image_without_annotations_is_kept(tmp_path):
    dataset = _dataset(tmp_path, [dict(bbox=[2, 2, 5, 5], category_id=1)])
    assert len(dataset) == 2
    assert len(dataset[1]['data_samples'].gt_instances) == 0


def test_corrupt_image_names_the_file(tmp_path):
    dataset = _dataset(tmp_path, [dict(bbox=[2, 2, 5, 5], category_id=1)])
    (tmp_path / 'img' / 'a.png').write_bytes(b'not a png at all')
    with pytest.raises(Exception, match='a.png'):
        dataset[0]


def test_missing_image_names_the_file(tmp_path):
    dataset = _dataset(tmp_path, [dict(bbox=[2, 2, 5, 5], category_id=1)])
    (tmp_path / 'img' / 'b.png').unlink()
    with pytest.raises(FileNotFoundError, match='b.png'):
        dataset[1]


def test_num_classes_mismatch_stops_training(tmp_path):
    """mmdet's NumClassCheckHook (in the shapes runtime) names both
    numbers before the first iteration."""
    proc = subprocess.run([
        sys.executable,
        osp.join(REPO_ROOT, 'tools/train.py'),
        osp.join(REPO_ROOT,
                 'configs/shapes/dino-tiny_shapes.py'), '--work-dir',
        str(tmp_path / 'work'), '--cfg-options',
        'model.bbox_head.num_classes=5',
        'train_dataloader.dataset.num_images=4',
        'val_dataloader.dataset.num_images=4'
    ],
                          cwd=tmp_path,
                          capture_output=True,
                          text=True,
                          timeout=600,
                          env=dict(
                              __import__('os').environ, PYTHONPATH=REPO_ROOT))
    assert proc.returncode != 0
    assert 'num_classes' in proc.stderr and '(5)' in proc.stderr
    assert 'Iter(train)' not in proc.stdout + proc.stderr
