"""The README's demo: train a config on the shapes data, evaluate, draw.

Prints the COCO bbox mAP on shapes val and the wall time, writes
``<work-dir>/demo_result.json`` and ``<work-dir>/demo_predictions.png``
(predictions drawn on a few val images with mmdet's visualizer).

    python tools/demo.py configs/shapes/dino-tiny_shapes.py \\
        --work-dir work_dirs/demo
"""
import argparse
import glob
import json
import os.path as osp
import statistics
import time

import mmcv
import numpy as np
import torch
from mmdet.visualization import DetLocalVisualizer
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.runner import Runner

import projects_detr_plus  # noqa: F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class KeepMetrics(Hook):
    """Remembers the metrics of the last validation."""

    def __init__(self):
        self.metrics = {}

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('--work-dir', default='work_dirs/demo')
    parser.add_argument(
        '--num-vis', type=int, default=4, help='val images drawn into the PNG')
    parser.add_argument('--score-thr', type=float, default=0.3)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args()


def enlarged(image, sample, scale):
    """The image and the sample's boxes (GT and predictions) ``scale``
    times larger, so that label text is readable on small images."""
    image = mmcv.imrescale(image, scale, interpolation='nearest')
    sample = sample.clone()
    for field in ('gt_instances', 'pred_instances'):
        if field in sample:
            instances = sample.get(field)
            boxes = instances.bboxes
            boxes = getattr(boxes, 'tensor', boxes)  # HorizontalBoxes
            instances.bboxes = boxes * scale
    return image, sample


def draw_predictions(runner, out_file, num_images, score_thr, scale=4):
    """Run the trained model on the first val images; ground truth (left)
    beside the predictions (right) of each image, images stacked."""
    visualizer = DetLocalVisualizer(name='demo_vis', line_width=2)
    visualizer.dataset_meta = runner.val_dataloader.dataset.metainfo
    runner.model.eval()
    drawings = []
    for data in runner.val_dataloader:
        with torch.no_grad():
            samples = runner.model.test_step(data)
        for sample in samples:
            image = mmcv.imread(sample.img_path, channel_order='rgb')
            image, sample = enlarged(image, sample, scale)
            visualizer.add_datasample(
                'pred', image, sample, draw_gt=True, pred_score_thr=score_thr)
            drawings.append(visualizer.get_image())
            if len(drawings) == num_images:
                mmcv.imwrite(
                    np.concatenate(drawings, axis=0)[..., ::-1], out_file)
                return out_file
    return None


DINO = 'configs/shapes/dino-tiny_shapes.py'


def trained_configs(config):
    """``config`` (relative to the repository) and, when it trains for a
    time budget (``TrainTimeBudgetHook``, as the demo's does), the configs
    it inherits from directly: it is the model of those, trained for a
    number of seconds, so the study of those is quoted."""
    paths = [config]
    try:
        cfg = Config.fromfile(osp.join(ROOT, config))
        bases = Config._get_base_files(osp.join(ROOT, config))
    except (OSError, SyntaxError):
        return paths
    hooks = [hook.get('type') for hook in cfg.get('custom_hooks', [])]
    if 'TrainTimeBudgetHook' in hooks:
        paths += [
            osp.normpath(osp.join(osp.dirname(config), base)) for base in bases
            if '::' not in base
        ]
    return paths


def study_line(config, results_dir):
    """What the committed convergence studies measured for ``config`` (or
    the config it inherits from) and for plain DINO: mean and range over
    the seeds of the study with the most seeds, then an equal-wall-clock
    one, then iterations (the demo does not train DINO a second time). None
    without a study."""
    studies = []
    for name in sorted(glob.glob(osp.join(results_dir, 'convergence*.json'))):
        with open(name) as f:
            studies.append((name, json.load(f)))

    def best(path):
        found = []
        for name, study in studies:
            changed = study.get('options', {})  # variants: not the file
            for method, cfg in study.get('methods', {}).items():
                finals = study['summary'].get(method,
                                              {}).get('final_per_seed', {})
                same = cfg and osp.normpath(cfg) == osp.normpath(path)
                if same and finals and not changed.get(method):
                    length = (f'{study["seconds"]} s of training'
                              if study.get('seconds') else
                              f'{study["iters"]} iterations')
                    # most seeds, then equal wall clock (the demo's own
                    # measure), then the longest
                    found.append(
                        (len(finals), bool(study.get('seconds')),
                         study['iters'], list(finals.values()), length, name))
        return max(found, default=None)

    def text(entry):
        seeds, _, _, finals, length, name = entry
        return (f'{statistics.mean(finals):.3f} (seeds {min(finals):.3f}-'
                f'{max(finals):.3f}, {seeds} seeds) after {length} in '
                f'{osp.basename(name)}')

    ours = next(((path, entry)
                 for path in trained_configs(config) if (entry := best(path))),
                None)  # the config itself first
    dino = best(DINO)
    if dino is None:
        return None
    line = f'plain DINO in the study: {text(dino)}'
    if ours is not None and osp.normpath(config) != osp.normpath(DINO):
        path, entry = ours
        name = '' if path == config else f' ({osp.basename(path)})'
        line = f'this config{name} in the study: {text(entry)}; ' + line
    return line


def main():
    args = parse_args()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = args.work_dir
    start = time.time()
    runner = Runner.from_cfg(cfg)
    keep = KeepMetrics()
    runner.register_hook(keep, priority='LOWEST')
    runner.train()  # the iteration-based loop validates at its last iteration
    seconds = time.time() - start
    vis = draw_predictions(runner,
                           osp.join(args.work_dir, 'demo_predictions.png'),
                           args.num_vis, args.score_thr)
    m_ap = keep.metrics.get('coco/bbox_mAP', float('nan'))
    result = dict(
        config=args.config,
        bbox_mAP=m_ap,
        train_and_eval_seconds=round(seconds, 1),
        max_iters=runner.train_loop.max_iters,  # as trained
        metrics=keep.metrics,
        predictions_png=vis)
    with open(osp.join(args.work_dir, 'demo_result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'\nDEMO: shapes val COCO bbox mAP = {m_ap:.3f} after '
          f'{result["max_iters"]} iterations in {seconds / 60:.1f} min '
          f'(train + eval); predictions drawn to {vis}')
    study = study_line(
        osp.relpath(osp.abspath(args.config), ROOT),
        osp.join(ROOT, 'benchmarks', 'results'))
    if study:
        print(study)


if __name__ == '__main__':
    main()
