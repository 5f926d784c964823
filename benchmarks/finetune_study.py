"""Fine-tuning study: does a shapes-trained model fine-tune on a small
dataset of another look better than the same model trained from scratch?

The target is ``configs/shapes/dino-tiny_stripes.py``'s data: 100 training
and 100 val images, 3 classes (triangle, and ring and arrow, which the
shapes data never has), striped backgrounds.  Per method (DINO, DDQ-DETR,
Co-DINO, their tiny shapes configs):

1. **pretrain**: the method's shapes config, ``--pretrain-iters``
   iterations from scratch on the 2000 shapes images (seed 0, as the
   convergence study), its weights kept;
2. per seed of ``--seeds``, two arms on the target data, ``--iters``
   iterations each (the target config's schedule: warm-up, LR drop at
   90 %), evaluated on the target's val split: **finetune** loads the
   pretrained weights (``load_from``: the 6-class classifiers keep their
   initialisation, everything else loads), **scratch** does not.

Every run is a unit (``benchmarks/convergence.py --run-one`` in its own
process, ``--jobs`` at a time); its result (and the pretrained weights)
stay in ``--workdir`` and are not run again, so the same command continues
an interrupted study.  Writes ``<out>.json`` (machine, every curve, per
method and arm the final mAP: mean, standard deviation, each seed, and
fine-tuning's gain) and prints a markdown table.

    python benchmarks/finetune_study.py --workdir work_dirs/finetune \\
        --out benchmarks/results/finetune_stripes_cpu
    python benchmarks/finetune_study.py --quick --out /tmp/ft  # smoke run
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
CONVERGENCE = osp.join(ROOT, 'benchmarks', 'convergence.py')
TARGET = 'configs/shapes/dino-tiny_stripes.py'
METHODS = {
    'dino': 'configs/shapes/dino-tiny_shapes.py',
    'ddq-detr': 'configs/shapes/ddq-detr-tiny_shapes.py',
    'co-dino': 'configs/shapes/co-dino-tiny_shapes.py',
}
ARMS = ('finetune', 'scratch')
PRETRAIN_SEED = 0
METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50')


def target_options():
    """Config options that put a shapes config on the target data: its
    datasets, evaluators and class count (``TARGET``'s)."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, TARGET), import_custom_modules=False)
    options = {}
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[loader].dataset
        for key in ('data_root', 'num_images', 'seed', 'shapes_cfg'):
            options[f'{loader}.dataset.{key}'] = dataset[key]
    for evaluator in ('val_evaluator', 'test_evaluator'):
        options[f'{evaluator}.ann_file'] = cfg[evaluator].ann_file
    options['model.bbox_head.num_classes'] = cfg.model.bbox_head.num_classes
    return json.loads(json.dumps(options))  # tuples as lists, as in JSON


def run_unit(name,
             config,
             seed,
             iters,
             interval,
             options,
             args,
             checkpoint=None):
    """One training run in its own process; its stored result if it ran
    already (with the same length)."""
    out = osp.join(args.workdir, f'{name}_seed{seed}.json')
    if osp.exists(out):
        with open(out) as f:
            earlier = json.load(f)
        if earlier['iters'] != iters:
            raise ValueError(f'{out} is a run of {earlier["iters"]} '
                             f'iterations, not {iters}: use another '
                             '--workdir')
        return earlier
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [
        sys.executable, CONVERGENCE, '--run-one', config, '--seed',
        str(seed), '--iters',
        str(iters), '--interval',
        str(interval), '--result', out, '--options',
        json.dumps(options)
    ]
    if checkpoint:
        cmd += ['--save-checkpoint', checkpoint]
    with open(out.replace('.json', '.log'), 'w') as log:
        subprocess.run(
            cmd, env=env, stdout=log, stderr=log, check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def pretrain(method, args):
    """The method's shapes-trained weights and their run (trained on first
    use): (checkpoint path, run)."""
    checkpoint = osp.join(args.workdir,
                          f'{method}_pretrain_seed{PRETRAIN_SEED}.pth')
    run = run_unit(f'{method}_pretrain', METHODS[method], PRETRAIN_SEED,
                   args.pretrain_iters, args.pretrain_iters, {}, args,
                   checkpoint)
    return checkpoint, run


def run_study(args):
    """Pretraining first (one unit per method), then every arm and seed;
    returns {method: {arm: [run per seed]}} and the pretraining runs."""
    target = target_options()
    with ThreadPoolExecutor(args.jobs) as pool:
        pretraining = dict(
            zip(args.methods,
                pool.map(lambda m: pretrain(m, args), args.methods)))

        def arm_unit(method, arm, seed):
            options = dict(target)
            if arm == 'finetune':
                options['load_from'] = osp.abspath(pretraining[method][0])
            return run_unit(f'{method}_{arm}', METHODS[method], seed,
                            args.iters, args.interval, options, args)

        units = [(m, a, s) for m in args.methods for a in ARMS
                 for s in args.seeds]
        done = list(pool.map(lambda u: arm_unit(*u), units))
    runs = {m: {a: [] for a in ARMS} for m in args.methods}
    for (method, arm, _), run in zip(units, done):
        runs[method][arm].append(run)
    return runs, {m: run for m, (_, run) in pretraining.items()}


def final(run, metric='coco/bbox_mAP'):
    return run['curve'][-1]['metrics'][metric]


def summarize(runs):
    """Per method and arm: per metric the final value's mean, standard
    deviation and per seed; per method fine-tuning's gain in mean mAP."""
    summary = {}
    for method, arms in runs.items():
        summary[method] = {}
        for arm, arm_runs in arms.items():
            summary[method][arm] = {
                metric:
                dict(
                    mean=statistics.mean(final(r, metric) for r in arm_runs),
                    std=statistics.stdev([final(r, metric) for r in arm_runs])
                    if len(arm_runs) > 1 else 0.0,
                    per_seed={r['seed']: final(r, metric)
                              for r in arm_runs})
                for metric in METRICS
            }
        summary[method]['gain'] = (
            summary[method]['finetune']['coco/bbox_mAP']['mean'] -
            summary[method]['scratch']['coco/bbox_mAP']['mean'])
    return summary


def table(summary, pretrain_runs):
    lines = [
        '| method | shapes mAP (pretrained) | fine-tuned mAP | from scratch '
        'mAP | gain | fine-tuned mAP50 | scratch mAP50 |', '|---|---|---|---|'
        '---|---|---|'
    ]
    for method, s in summary.items():
        ft, sc = s['finetune'], s['scratch']

        def cell(stats):
            seeds = ', '.join(f'{v:.3f}' for v in stats['per_seed'].values())
            return f'{stats["mean"]:.3f} +- {stats["std"]:.3f} ({seeds})'

        lines.append(
            f'| {method} | {final(pretrain_runs[method]):.3f} | '
            f'{cell(ft["coco/bbox_mAP"])} | {cell(sc["coco/bbox_mAP"])} | '
            f'{s["gain"]:+.3f} | {ft["coco/bbox_mAP_50"]["mean"]:.3f} | '
            f'{sc["coco/bbox_mAP_50"]["mean"]:.3f} |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--methods', nargs='+', choices=list(METHODS), default=list(METHODS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument(
        '--pretrain-iters',
        type=int,
        default=2000,
        help='shapes iterations of the pretrained model (the convergence '
        "study's protocol)")
    parser.add_argument(
        '--iters',
        type=int,
        default=500,
        help="iterations on the target data (its config's)")
    parser.add_argument('--interval', type=int, default=250)
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--out', default='finetune_study')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: DINO, 1 seed, 2 + 2 iterations')
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.seeds = ['dino'], [0]
        args.pretrain_iters, args.iters, args.interval = 2, 2, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
    from machine import describe  # benchmarks/machine.py
    args.workdir = args.workdir or tempfile.mkdtemp(prefix='finetune_runs_')
    os.makedirs(args.workdir, exist_ok=True)
    runs, pretrain_runs = run_study(args)
    summary = summarize(runs)
    result = dict(
        target=TARGET,
        methods=METHODS,
        pretrain_iters=args.pretrain_iters,
        pretrain_seed=PRETRAIN_SEED,
        iters=args.iters,
        seeds=args.seeds,
        jobs=args.jobs,
        machine=describe(),
        date=time.strftime('%Y-%m-%d'),
        summary=summary,
        pretraining=pretrain_runs,
        runs=runs)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(result, f, indent=2)
    print(table(summary, pretrain_runs))
    return result


if __name__ == '__main__':
    main()
