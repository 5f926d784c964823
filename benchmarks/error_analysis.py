"""Where a trained detector loses bbox mAP: class confusion and duplicates.

Runs a checkpoint on the val split of its config and scores the same
detections four ways with pycocotools:

- ``classwise``: the COCO bbox mAP that ``make demo`` reports;
- ``agnostic``: every label merged into one, so a box of the wrong class
  counts; the gap to ``classwise`` is what class confusion costs;
- ``classwise_nms`` / ``agnostic_nms``: the same after class-wise NMS at
  ``--nms-iou``; the gain is what duplicate boxes cost a set-prediction model
  that has not yet learnt to suppress them.

    python benchmarks/error_analysis.py configs/shapes/dino-tiny_shapes.py \
        work_dirs/demo/iter_2000.pth --json out.json
    python benchmarks/error_analysis.py configs/shapes/dino-tiny_shapes.py \
        --quick                      # smoke run: untrained model, 8 images
"""
import argparse
import contextlib
import copy
import io
import json
import os.path as osp
import sys

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)


def coco_scores(gt_dataset, detections, img_ids, agnostic=False):
    """COCO bbox mAP, AP50 and AR@100 of ``detections`` on ``img_ids``.

    Args:
        gt_dataset (dict): COCO-format annotations (not modified).
        detections (list[dict]): COCO results: image_id, category_id,
            bbox (x, y, w, h), score.
        img_ids (list[int]): the images the detections were computed on.
        agnostic (bool): merge every category into one first.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt_dataset = copy.deepcopy(gt_dataset)
    if agnostic:
        for ann in gt_dataset['annotations']:
            ann['category_id'] = 1
        gt_dataset['categories'] = [dict(id=1, name='object')]
        detections = [dict(d, category_id=1) for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dataset
        gt.createIndex()
        if not detections:
            return dict(mAP=0.0, AP50=0.0, AR100=0.0)
        evaluator = COCOeval(gt, gt.loadRes(detections), 'bbox')
        evaluator.params.imgIds = list(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats]
    return dict(mAP=stats[0], AP50=stats[1], AR100=stats[8])


def classwise_nms(detections, iou_threshold):
    """Per image and class, drop boxes overlapping a higher-scored one."""
    from mmcv.ops import batched_nms
    by_image = {}
    for det in detections:
        by_image.setdefault(det['image_id'], []).append(det)
    kept = []
    for dets in by_image.values():
        xywh = torch.tensor([d['bbox'] for d in dets], dtype=torch.float32)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        scores = torch.tensor([d['score'] for d in dets], dtype=torch.float32)
        labels = torch.tensor([d['category_id'] for d in dets])
        _, keep = batched_nms(boxes, scores, labels,
                              dict(type='nms', iou_threshold=iou_threshold))
        kept += [dets[i] for i in keep.tolist()]
    return kept


def breakdown(gt_dataset, detections, img_ids, nms_iou):
    """The four scores of the module docstring."""
    after_nms = classwise_nms(detections, nms_iou) if detections else []
    return dict(
        classwise=coco_scores(gt_dataset, detections, img_ids),
        agnostic=coco_scores(gt_dataset, detections, img_ids, True),
        classwise_nms=coco_scores(gt_dataset, after_nms, img_ids),
        agnostic_nms=coco_scores(gt_dataset, after_nms, img_ids, True))


def predict_val(config, checkpoint, num_images):
    """COCO-format detections of the config's model on its val split."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import load_checkpoint

    import projects_detr_plus  # noqa: F401
    register_all_modules()
    cfg = Config.fromfile(config)
    dataset_cfg = cfg.val_dataloader.dataset
    if num_images:
        dataset_cfg.indices = num_images
    dataset = DATASETS.build(dataset_cfg)
    model = MODELS.build(cfg.model).eval()
    if checkpoint:
        load_checkpoint(model, checkpoint, map_location='cpu')
    cat_ids = dataset.cat_ids
    detections, img_ids = [], []
    for index in range(len(dataset)):
        with torch.no_grad():
            (sample, ) = model.test_step(pseudo_collate([dataset[index]]))
        img_ids.append(sample.img_id)
        pred = sample.pred_instances
        for box, score, label in zip(pred.bboxes.tolist(),
                                     pred.scores.tolist(),
                                     pred.labels.tolist()):
            detections.append(
                dict(
                    image_id=sample.img_id,
                    category_id=cat_ids[label],
                    bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    score=score))
    with open(cfg.val_evaluator.ann_file) as f:
        gt_dataset = json.load(f)
    return gt_dataset, detections, img_ids


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        help='trained weights (required unless --quick)')
    parser.add_argument('--nms-iou', type=float, default=0.6)
    parser.add_argument(
        '--num-images',
        type=int,
        default=None,
        help='the first N val images (default: all)')
    parser.add_argument('--json', help='write the result here')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: untrained model, 8 val images')
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = 8
    elif not args.checkpoint:
        parser.error('a checkpoint is required (or --quick)')
    return args


def main(argv=None):
    args = parse_args(argv)
    gt_dataset, detections, img_ids = predict_val(args.config, args.checkpoint,
                                                  args.num_images)
    result = dict(
        config=args.config,
        checkpoint=args.checkpoint,
        images=len(img_ids),
        nms_iou=args.nms_iou,
        scores=breakdown(gt_dataset, detections, img_ids, args.nms_iou))
    for name, score in result['scores'].items():
        print(f"{name:14s} mAP {score['mAP']:.3f}  AP50 {score['AP50']:.3f}"
              f"  AR@100 {score['AR100']:.3f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
