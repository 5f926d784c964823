"""Detect objects with an exported DETR+ ONNX file and draw them.

    python tools/deployment/onnx_demo.py model.onnx CONFIG img1.jpg img2.jpg \\
        --out-dir work_dirs/onnx_demo --score-thr 0.3

Each image goes through the config's test pipeline (resize) and data
preprocessor (normalise) in PyTorch, then through the ONNX file in ONNX
Runtime; the boxes are scaled back to the original image and drawn with
mmdet's ``DetLocalVisualizer`` into ``OUT_DIR/<image name>.png``.  Images
are run one at a time, so none is padded (the exported graph assumes every
image fills its input).  Needs the deploy extra:
``pip install "projects_detr_plus[deploy]"``.
"""
import argparse
import os
import os.path as osp
import sys
import time

import mmcv
import numpy as np
import torch
from mmengine.config import Config

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='ONNX Runtime inference and drawing of a DETR+ model')
    parser.add_argument('model', help='the exported .onnx file')
    parser.add_argument('config', help='the config it was exported from')
    parser.add_argument('images', nargs='+', help='image files')
    parser.add_argument(
        '--out-dir', default='work_dirs/onnx_demo', help='where the PNGs go')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='draw detections scoring above this')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='ONNX Runtime intra-op threads')
    return parser.parse_args(argv)


def preprocess(pipeline, preprocessor, image_path):
    """(1, 3, H, W) input batch and its data sample (img_shape, scale)."""
    data = pipeline(dict(img_path=image_path, img_id=0))
    batch = preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]),
        False)
    sample = batch['data_samples'][0]
    if tuple(sample.img_shape[:2]) != tuple(batch['inputs'].shape[-2:]):
        print(f'warning: {image_path} is padded from {sample.img_shape} to '
              f'{tuple(batch["inputs"].shape[-2:])}; the exported graph '
              'assumes no padding (pad_size_divisor=1)')
    return batch['inputs'], sample


def detections(dets, labels, sample):
    """The valid rows as an InstanceData in original-image pixels."""
    from mmengine.structures import InstanceData

    from projects_detr_plus.deployment.utils import rescale_boxes
    valid = labels >= 0
    boxes = rescale_boxes(dets[valid, :4], sample.scale_factor)
    h, w = sample.ori_shape[:2]
    boxes = np.clip(boxes, 0, [w, h, w, h])
    return InstanceData(
        bboxes=torch.from_numpy(boxes).float(),
        scores=torch.from_numpy(dets[valid, 4]).float(),
        labels=torch.from_numpy(labels[valid]).long())


def main(argv=None):
    args = parse_args(argv)
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules
    from mmdet.visualization import DetLocalVisualizer

    import projects_detr_plus  # noqa: F401
    from projects_detr_plus.deployment import OnnxDetector
    from projects_detr_plus.deployment.utils import dataset_meta, test_pipeline
    register_all_modules()
    cfg = Config.fromfile(args.config)
    detector = OnnxDetector(args.model, threads=args.threads)
    pipeline = test_pipeline(cfg)
    preprocessor = MODELS.build(cfg.model.data_preprocessor)
    visualizer = DetLocalVisualizer(name='onnx_demo')
    visualizer.dataset_meta = dataset_meta(cfg)
    os.makedirs(args.out_dir, exist_ok=True)
    for path in args.images:
        inputs, sample = preprocess(pipeline, preprocessor, path)
        start = time.time()
        dets, labels = detector(inputs)
        seconds = time.time() - start
        result = DetDataSample(metainfo=sample.metainfo)
        result.pred_instances = detections(dets[0], labels[0], sample)
        image = mmcv.imread(path, channel_order='rgb')
        name = osp.splitext(osp.basename(path))[0]
        out_file = osp.join(args.out_dir, f'{name}.png')
        visualizer.add_datasample(
            name,
            image,
            result,
            draw_gt=False,
            pred_score_thr=args.score_thr,
            out_file=out_file)
        shown = int((result.pred_instances.scores > args.score_thr).sum())
        print(f'{path}: input {tuple(inputs.shape[-2:])}, ONNX Runtime '
              f'{seconds * 1000:.0f} ms, {shown} detections above '
              f'{args.score_thr} -> {out_file}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
