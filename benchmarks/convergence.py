"""Convergence study: bbox mAP against training for every method's tiny
shapes config, from scratch on the embedded shapes data, 3 seeds each.

Every (method, seed) run is a unit: it trains in its own process (``--jobs``
at a time, the CPU threads split between them) and stores its curve in
``--workdir`` as it finishes; a unit whose result is there is not run again,
so the same command continues an interrupted study. Two modes:

* equal iterations (default): ``--iters`` for every method (learning rate
  drop at 90 %), evaluated on shapes val every ``--interval`` iterations;
* equal wall clock (``--seconds S``): every method trains for S seconds
  (evaluation not counted): after ``--calibrate`` iterations the run sets its
  length from its own step time, with the learning-rate drop at 90 % and 4
  evaluations.

Writes ``<out>.json`` (every curve), ``<out>.png`` (mean over seeds per
method, min-max band) and prints a markdown table of the final mAP: mean,
standard deviation, each seed, and the difference to the method's base
(:data:`BASES`).

    python benchmarks/convergence.py --out benchmarks/results/convergence_cpu
    python benchmarks/convergence.py --methods dino group-dino --iters 1000

Data go to ``data/shapes/`` under the working directory, as the configs'.
    python benchmarks/convergence.py --quick --out /tmp/conv   # smoke run
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from os import path as osp

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
METHODS = {
    'dino': 'configs/shapes/dino-tiny_shapes.py',
    'group-dino': 'configs/shapes/group-dino-tiny_shapes.py',
    'h-dino': 'configs/shapes/h-dino-tiny_shapes.py',
    'co-dino': 'configs/shapes/co-dino-tiny_shapes.py',
    'ddq-detr': 'configs/shapes/ddq-detr-tiny_shapes.py',
    # the demo's recipe: 2 decoder layers, LEAN_QUERIES, FUSED_ADAMW
    'ddq-detr-lean': 'configs/shapes/ddq-detr-lean-tiny_shapes.py',
    'co-ddq-detr': 'configs/shapes/co-ddq-detr-tiny_shapes.py',
    'deformable-detr-2stage':
    'configs/shapes/deformable-detr-refine-twostage-tiny_shapes.py',
    'h-deformable-detr': 'configs/shapes/h-deformable-detr-tiny_shapes.py',
    'co-deformable-detr': 'configs/shapes/co-deformable-detr-tiny_shapes.py',
    'atss': 'configs/shapes/atss-tiny_shapes.py',
    'ddq-fcn': 'configs/shapes/ddq-fcn-tiny_shapes.py',
    'sparse-rcnn': 'configs/shapes/sparse-rcnn-tiny_shapes.py',
    'ddq-rcnn': 'configs/shapes/ddq-rcnn-tiny_shapes.py',
    # supervision tricks beyond the seeds (issue #31)
    'align-dino': 'configs/shapes/align-detr-tiny_shapes.py',
    'stable-dino': 'configs/shapes/stable-dino-tiny_shapes.py',
    'ms-detr': 'configs/shapes/ms-detr-tiny_shapes.py',
    # their combinations with the seeds' detectors (issue #31)
    'co-dino+stable': 'configs/shapes/co-dino-stable-tiny_shapes.py',
    'ddq-detr+align': 'configs/shapes/ddq-detr-align-tiny_shapes.py',
    'h-deformable+ms-detr':
    'configs/shapes/h-deformable-ms-detr-tiny_shapes.py',
}
# the tiny backbone's four ResNet stages (strides 4-32) as the 4 levels
P2_LEVELS = {
    'model.backbone.out_indices': (0, 1, 2, 3),
    'model.neck.in_channels': [32, 64, 128, 256]
}
FUSED_ADAMW = {'optim_wrapper.optimizer.fused': True}  # torch >= 2.4 on CPU
# the same 128 px images resized to 256 px: 4x the encoder tokens (1360),
# the data and val split unchanged (Resize is the pipelines' 3rd / 2nd step)
UPSCALED_256 = {
    'train_dataloader.dataset.pipeline.2.scale': 256,
    'val_dataloader.dataset.pipeline.1.scale': 256,
    'test_dataloader.dataset.pipeline.1.scale': 256
}
# 20 denoising queries (2 groups of ~10 objects) instead of 50, and as many
# dense (one-to-many) queries as one-to-one ones instead of 1.5x
LEAN_QUERIES = {
    'model.dn_cfg.group_cfg.num_dn_queries': 20,
    'model.dense_topk_ratio': 1.0
}
# variants: method -> (its base method, config options): the DDQ paper's
# components that the released code does not have, and a baseline check
VARIANTS = {
    'ddq-fcn+near-centre': ('ddq-fcn', {
        'model.bbox_head.positives_near_centre': 9
    }),
    'ddq-rcnn+near-centre': ('ddq-rcnn', {
        'model.rpn_head.positives_near_centre': 9
    }),
    'ddq-rcnn+query-fusion': ('ddq-rcnn', {
        'model.roi_head.query_roi_fusion': True
    }),
    'ddq-rcnn+flexible-roi': ('ddq-rcnn', {
        'model.roi_head.bbox_roi_extractor.type':
        'FlexibleRoIExtractor'
    }),
    # the baseline at DDQ R-CNN's learning rate (its own is 4x lower)
    'sparse-rcnn+lr1e-3': ('sparse-rcnn', {
        'optim_wrapper.optimizer.lr': 1e-3
    }),
    # recipe search: the stride-4 level (P2) instead of the extra stride-64
    # one, for objects of 8 pixels
    'ddq-detr+p2': ('ddq-detr', P2_LEVELS),
    'dino+p2': ('dino', P2_LEVELS),
    # recipe search at equal wall clock: cheaper DDQ-DETR steps (step times
    # from benchmarks/step_variants.py); fused AdamW is the same update
    'ddq-detr+2dec':
    ('ddq-detr', dict(FUSED_ADAMW, **{'model.decoder.num_layers': 2})),
    'ddq-detr+lean': ('ddq-detr', dict(FUSED_ADAMW, **LEAN_QUERIES)),
    # MS-DETR below its base: its recipe's one-to-one classification
    # weight 1 replaced by the base's 2, to tell the weight from the branch
    'ms-detr+cls2': ('ms-detr', {
        'model.bbox_head.loss_cls.loss_weight': 2.0
    }),
    # H-Deformable-DETR below its base: its 300 queries take 88 % of the
    # 340 encoder tokens of a 128 px image, 22 % at 256 px (COCO: 9 %)
    'deformable-detr-2stage@256px': ('deformable-detr-2stage', UPSCALED_256),
    'h-deformable-detr@256px': ('h-deformable-detr', UPSCALED_256),
}
METHODS.update({name: METHODS[base] for name, (base, _) in VARIANTS.items()})
# what each method is compared with: the model it adds its idea to
BASES = {
    'group-dino': 'dino',
    'h-dino': 'dino',
    'co-dino': 'dino',
    'ddq-detr': 'dino',
    'co-ddq-detr': 'ddq-detr',
    'ddq-detr-lean': 'ddq-detr',
    'h-deformable-detr': 'deformable-detr-2stage',
    'co-deformable-detr': 'deformable-detr-2stage',
    'ddq-fcn': 'atss',
    'ddq-rcnn': 'sparse-rcnn',
    'align-dino': 'dino',
    'stable-dino': 'dino',
    'ms-detr': 'deformable-detr-2stage',
    # a combination's base is its detector; its trick's own run is the
    # other part it is compared with (README)
    'co-dino+stable': 'co-dino',
    'ddq-detr+align': 'ddq-detr',
    'h-deformable+ms-detr': 'h-deformable-detr',
}
BASES.update({name: base for name, (base, _) in VARIANTS.items()})
BASES['h-deformable-detr@256px'] = 'deformable-detr-2stage@256px'


def method_options(method):
    """The config options of ``method`` (empty for a shipped config)."""
    return VARIANTS.get(method, (None, {}))[1]


def run_one(config,
            seed,
            iters,
            interval,
            out,
            train_images=None,
            val_images=None,
            options=None,
            seconds=None,
            calibrate=20,
            recheck=None,
            save_checkpoint=None):
    """Train ``config`` with ``seed``; write [(iteration, training seconds,
    metrics)] to out. With ``seconds``, train for that long instead of
    ``iters`` iterations (the length set after ``calibrate`` iterations
    and, with ``recheck``, set again every ``recheck`` iterations). With
    ``save_checkpoint``, the trained weights go to that file (before
    ``out`` is written)."""
    import torch
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    sys.path.insert(0, ROOT)
    # importing the package registers its modules
    from projects_detr_plus.utils import TrainTimeBudgetHook

    # 4 evaluations, the last at the end, the LR drop at 90 %
    clock = TrainTimeBudgetHook(
        seconds, calibrate, evaluations=4, recheck=recheck)

    class RecordMetrics(Hook):

        def __init__(self):
            self.curve = []

        def after_val_epoch(self, runner, metrics=None):
            self.curve.append(
                dict(
                    iteration=runner.iter,
                    seconds=clock.train_seconds(),
                    metrics=dict(metrics or {})))

    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.merge_from_dict(options or {})
    cfg.work_dir = tempfile.mkdtemp(prefix='convergence_')
    cfg.train_cfg.update(max_iters=iters, val_interval=interval)
    cfg.param_scheduler[-1].update(end=iters, milestones=[int(iters * 0.9)])
    cfg.default_hooks.checkpoint.update(interval=iters + 1)
    cfg.default_hooks.logger.interval = max(interval // 4, 1)
    cfg.randomness = dict(seed=seed)
    if train_images or val_images:  # own data folder, the default untouched
        train_set = cfg.train_dataloader.dataset
        val_set = cfg.val_dataloader.dataset
        data_root = (
            train_set.data_root.rstrip('/') +
            f'_train{train_images}_val{val_images}/')
        train_set.update(
            data_root=data_root,
            num_images=train_images or train_set.num_images)
        val_set.update(
            data_root=data_root, num_images=val_images or val_set.num_images)
        cfg.val_evaluator.ann_file = osp.join(
            data_root, 'annotations/instances_val.json')
    start = time.time()
    runner = Runner.from_cfg(cfg)
    record = RecordMetrics()
    runner.register_hook(clock)
    runner.register_hook(record, priority='LOWEST')
    runner.train()
    if save_checkpoint:
        runner.save_checkpoint(
            osp.dirname(osp.abspath(save_checkpoint)),
            osp.basename(save_checkpoint),
            save_optimizer=False,
            save_param_scheduler=False)
    with open(out, 'w') as f:
        json.dump(
            dict(
                config=config,
                seed=seed,
                iters=runner.train_loop.max_iters,
                budget_seconds=seconds,
                recheck=recheck,
                seconds=time.time() - start,
                threads=torch.get_num_threads(),
                curve=record.curve),
            f,
            indent=2)


def launch(method, seed, args, workdir):
    mode = f'_{args.seconds}s' if args.seconds else ''
    out = osp.join(workdir, f'{method}{mode}_seed{seed}.json')
    if osp.exists(out):  # finished in an earlier invocation: resume
        with open(out) as f:
            earlier = json.load(f)
        ran = earlier.get('budget_seconds') or earlier['iters']
        if ran != (args.seconds or args.iters):
            raise ValueError(f'{out} is a run of {ran} '
                             f'{"seconds" if args.seconds else "iterations"}'
                             f', not {args.seconds or args.iters}: use '
                             'another --workdir')
        if args.seconds and earlier.get('recheck') != args.recheck:
            raise ValueError(f'{out} re-checked its length every '
                             f'{earlier.get("recheck")} iterations, not '
                             f'{args.recheck}: use another --workdir')
        return method, earlier
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [
        sys.executable, __file__, '--run-one', METHODS[method], '--seed',
        str(seed), '--iters',
        str(args.iters), '--interval',
        str(args.interval), '--result', out, '--options',
        json.dumps(method_options(method))
    ]
    for flag, value in (('--train-images', args.train_images),
                        ('--val-images', args.val_images), ('--seconds',
                                                            args.seconds),
                        ('--calibrate', args.calibrate), ('--recheck',
                                                          args.recheck)):
        if value:
            cmd += [flag, str(value)]
    log = open(out.replace('.json', '.log'), 'w')
    subprocess.run(cmd, env=env, stdout=log, stderr=log, check=True)
    with open(out) as f:
        return method, json.load(f)


def budget_clock(run):
    """An equal-wall-clock run's evaluation times on the budget's clock:
    iteration x budget / the run's length, the pace its calibration measured.
    Unlike the measured ``seconds``, it is not stretched by other jobs that
    load the machine after the length is set. 0 for an equal-iteration run.
    """
    pace = (run.get('budget_seconds') or 0) / run['iters']
    return [p['iteration'] * pace for p in run['curve']]


def summarize(runs):
    """Per method, per evaluation: iterations and training seconds (means
    over seeds), mean / min / max mAP; the final mAP's standard deviation,
    each seed's, and the difference to the base's mean."""
    summary = {}
    for method, results in runs.items():
        curves = [[p['metrics']['coco/bbox_mAP'] for p in r['curve']]
                  for r in results]
        finals = [c[-1] for c in curves]

        def seed_mean(per_run):
            """Per evaluation, the mean over seeds of per_run(run)."""
            return [
                statistics.mean(v) for v in zip(*[per_run(r) for r in results])
            ]

        summary[method] = dict(
            iterations=seed_mean(
                lambda r: [p['iteration'] for p in r['curve']]),
            seconds=seed_mean(
                lambda r: [p.get('seconds', 0.0) for p in r['curve']]),
            budget_clock=seed_mean(budget_clock),
            mean=[statistics.mean(v) for v in zip(*curves)],
            min=[min(v) for v in zip(*curves)],
            max=[max(v) for v in zip(*curves)],
            std=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            final_per_seed={
                r['seed']: c[-1]
                for r, c in zip(results, curves)
            },
            seconds_per_run=statistics.mean(r['seconds'] for r in results))
    for method, s in summary.items():
        base = BASES.get(method)
        if base in summary:
            s['base'] = base
            s['vs_base'] = s['mean'][-1] - summary[base]['mean'][-1]
    return summary


def plot(summary, png, title, by_time=False):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    key = 'budget_clock' if by_time else 'iterations'
    # a colour each (tab10 repeats after 10 methods); dashed: one seed only
    colours = plt.get_cmap('tab20' if len(summary) > 10 else 'tab10')
    for i, (method, s) in enumerate(summary.items()):
        x = [v / 60 for v in s[key]] if by_time else s[key]
        one_seed = len(s['final_per_seed']) == 1
        ax.plot(
            x,
            s['mean'],
            marker='o',
            color=colours(i),
            linestyle='--' if one_seed else '-',
            label=method)
        ax.fill_between(x, s['min'], s['max'], alpha=0.2, color=colours(i))
    ax.set_xlabel('training minutes (iteration x budget / run length)'
                  if by_time else 'iteration')
    ax.set_ylabel('shapes val bbox mAP')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def table(summary):
    lines = [
        '| method | final mAP (mean +- std) | per seed | vs base | '
        'iterations | min / run |', '|---|---|---|---|---|---|'
    ]
    for method, s in summary.items():
        seeds = ', '.join(f'{v:.3f}' for v in s['final_per_seed'].values())
        versus = (f"{s['vs_base']:+.3f} ({s['base']})" if 'base' in s else '-')
        lines.append(f"| {method} | {s['mean'][-1]:.3f} +- {s['std']:.3f} "
                     f"| {seeds} | {versus} | {s['iterations'][-1]:.0f} | "
                     f"{s['seconds_per_run'] / 60:.1f} |")
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--methods', nargs='+', choices=list(METHODS), default=list(METHODS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument(
        '--iters',
        type=int,
        default=750,
        help='default: about an hour for the 4 methods x 2 '
        'seeds on 2 cores')
    parser.add_argument('--interval', type=int, default=250)
    parser.add_argument(
        '--seconds',
        type=int,
        default=None,
        help='equal wall clock: train every run for this '
        'many seconds instead of --iters iterations')
    parser.add_argument(
        '--calibrate',
        type=int,
        default=20,
        help='with --seconds: iterations timed before the '
        'run sets its length')
    parser.add_argument(
        '--recheck',
        type=int,
        default=None,
        help='with --seconds: set the length again every '
        'RECHECK iterations from the last ones\' step time '
        '(default: set once, as in the committed study)')
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument(
        '--workdir',
        default=None,
        help='folder of the per-run results; a run whose '
        'result is there is not run again (resume)')
    parser.add_argument(
        '--train-images',
        type=int,
        default=None,
        help='other train split size (own data folder)')
    parser.add_argument(
        '--val-images',
        type=int,
        default=None,
        help='other val split size (own data folder)')
    parser.add_argument(
        '--out', default='convergence', help='writes OUT.json and OUT.png')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: 2 iterations, 1 seed, 16 train '
        'and 8 val images')
    parser.add_argument(
        '--combine',
        nargs='+',
        metavar='JSON',
        help='merge the runs of earlier result files (same '
        'iterations) into OUT instead of training; with '
        '--methods, only those methods')
    parser.add_argument('--run-one', help=argparse.SUPPRESS)
    parser.add_argument('--seed', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    parser.add_argument('--options', default='{}', help=argparse.SUPPRESS)
    parser.add_argument('--save-checkpoint', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.interval, args.seeds = 2, 1, [0]
        args.train_images, args.val_images = 16, 8
    return args


def main(argv=None):
    args = parse_args(argv)
    from machine import describe  # benchmarks/machine.py
    if args.run_one:
        return run_one(args.run_one, args.seed, args.iters, args.interval,
                       args.result, args.train_images, args.val_images,
                       json.loads(args.options), args.seconds, args.calibrate,
                       args.recheck, args.save_checkpoint)
    if args.combine:
        runs, workdir, seeds = {}, None, set()
        for path in args.combine:  # other methods and other seeds
            with open(path) as f:
                earlier = json.load(f)
            for method, method_runs in earlier['runs'].items():
                by_seed = {r['seed']: r for r in runs.get(method, [])}
                by_seed.update({r['seed']: r for r in method_runs})
                runs[method] = [by_seed[s] for s in sorted(by_seed)]
            seeds.update(earlier['seeds'])
            args.iters, args.seconds = earlier['iters'], earlier.get('seconds')
            args.recheck = earlier.get('recheck')
            args.interval, args.jobs = earlier['interval'], earlier['jobs']
        args.seeds = sorted(seeds)
        if args.methods != list(METHODS):  # --methods picks among them
            runs = {m: r for m, r in runs.items() if m in args.methods}
    else:
        workdir = args.workdir or tempfile.mkdtemp(prefix='convergence_runs_')
        os.makedirs(workdir, exist_ok=True)
        jobs = [(m, s) for m in args.methods for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(
                pool.map(lambda job: launch(*job, args, workdir), jobs))
        runs = {m: [r for name, r in done if name == m] for m in args.methods}
    summary = summarize(runs)
    result = dict(
        iters=args.iters,
        seconds=args.seconds,
        recheck=args.recheck,
        interval=args.interval,
        seeds=args.seeds,
        jobs=args.jobs,
        methods={m: METHODS.get(m)
                 for m in runs},
        options={m: method_options(m)
                 for m in runs if method_options(m)},
        machine=describe(),
        date=time.strftime('%Y-%m-%d'),
        summary=summary,
        runs=runs)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(result, f, indent=2)
    length = (f'{args.seconds / 60:.0f} training minutes'
              if args.seconds else f'{args.iters} iterations')
    plot(
        summary,
        args.out + '.png',
        f'shapes, {length}, seeds {args.seeds}',
        by_time=bool(args.seconds))
    print(table(summary))
    print(f'curves: {args.out}.json, plot: {args.out}.png, logs: {workdir}')
    return result


if __name__ == '__main__':
    main()
