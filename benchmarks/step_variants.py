"""Training-step time of a config's variants, measured in one process.

Each variant is the config with some options changed (``--variant NAME
JSON``); every model trains on its own config's shapes batches, and steps
alternate between the variants so that a machine that slows down or speeds
up affects them alike. Prints the median seconds per step, images per
second and the ratio to the config as it is; for equal-wall-clock recipe
choices, where a cheaper step buys more iterations.

    python benchmarks/step_variants.py \\
        configs/shapes/ddq-detr-tiny_shapes.py \\
        --variant foreach '{"optim_wrapper.optimizer.foreach": true}' \\
        --json out.json
"""
import argparse
import json
import statistics
import sys
import time
from os import path as osp

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.machine import describe  # noqa: E402
from benchmarks.train_step import build, write_json  # noqa: E402


def build_variant(config, options, num_batches):
    """The model, its optimizer wrapper and ``num_batches`` training
    batches of ``config`` with ``options``."""
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.runner import Runner
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401  (registers the modules)
    cfg = Config.fromfile(osp.join(ROOT, config))
    cfg.merge_from_dict(options)
    torch.manual_seed(0)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(num_batches)]
    torch.manual_seed(0)
    model, optim = build(cfg, 'cpu')
    return model, optim, batches, cfg.train_dataloader.batch_size


def time_variants(variants, iters, warmup):
    """Median seconds per step of each variant, steps interleaved."""
    times = {name: [] for name in variants}
    for step in range(warmup + iters):
        for name, (model, optim, batches, _) in variants.items():
            torch.manual_seed(step)
            start = time.perf_counter()
            model.train_step(batches[step], optim)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument(
        '--variant',
        nargs=2,
        action='append',
        default=[],
        metavar=('NAME', 'JSON'),
        help='a variant: its name and its config options')
    parser.add_argument(
        '--common',
        default='{}',
        metavar='JSON',
        help='options for every variant (e.g. the data)')
    parser.add_argument('--iters', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=10)
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch threads (default: torch\'s)')
    parser.add_argument('--json', help='write the result here')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = json.loads(args.common)
    options = {'as is': {}}
    for name, text in args.variant:
        if name in options:
            raise ValueError(f'variant {name!r} given twice')
        options[name] = json.loads(text)
    merged = {name: dict(common, **opts) for name, opts in options.items()}
    steps = args.warmup + args.iters
    variants = {
        name: build_variant(args.config, opts, steps)
        for name, opts in merged.items()
    }
    seconds = time_variants(variants, args.iters, args.warmup)
    base = seconds['as is']
    rows = {}
    for name, value in seconds.items():
        images = variants[name][3] / value
        rows[name] = dict(
            options=options[name],
            seconds_per_step=value,
            images_per_second=images,
            step_time_vs_as_is=value / base)
        print(f'{name:>24}: {value * 1e3:6.0f} ms/step, {images:5.1f} '
              f'images/s, {value / base:.3f}x the step as is')
    result = dict(
        config=args.config,
        common=common,
        iters=args.iters,
        warmup=args.warmup,
        machine=describe(),
        date=time.strftime('%Y-%m-%d'),
        variants=rows)
    write_json(result, args.json)
    return result


if __name__ == '__main__':
    main()
