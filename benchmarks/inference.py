"""Inference latency and throughput: a DETR+ config against mmdet's.

Same pairs, weights and synthetic images as ``train_step.py``.  For each
batch size the two models' ``test_step`` calls (preprocessing, backbone,
transformer, post-processing) are interleaved, warm-up excluded; the median
latency per batch and the images per second are reported with the ratio.

    python benchmarks/inference.py --pair dino-tiny \\
        --json benchmarks/results/inference_dino-tiny_cpu.json
    python benchmarks/inference.py --pair dino-r50 --batch-sizes 1 2 --iters 3
    python benchmarks/inference.py --quick
"""
import argparse
import copy
import statistics
import sys
import time
from os import path as osp

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train_step import (BASELINE_PAIRS, PAIRS, _sync, build, load_configs,
                        machine, synthetic_batch, write_json)


def time_inference(models, batch, iters, warmup, device):
    """Median seconds per ``test_step`` of each model, calls interleaved."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for step in range(warmup + iters):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model.test_step(copy.deepcopy(batch))
                _sync(device)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(args):
    configs = load_configs(args.pair)
    torch.manual_seed(0)
    reference = build(configs['mmdet'], args.device)[0].eval()
    ours = build(configs['ours'], args.device)[0].eval()
    if args.pair not in BASELINE_PAIRS:
        ours.load_state_dict(reference.state_dict(), strict=True)
    rows = []
    for batch_size in args.batch_sizes:
        batch = synthetic_batch(args.image_size, batch_size, 1, 0, args.device)
        seconds = time_inference(
            dict(mmdet=reference, ours=ours), batch, args.iters, args.warmup,
            args.device)
        rows.append(
            dict(
                batch_size=batch_size,
                latency_s=seconds,
                images_per_s={
                    k: batch_size / v
                    for k, v in seconds.items()
                },
                speedup_vs_mmdet=seconds['mmdet'] / seconds['ours']))
    return dict(
        pair=args.pair,
        configs=PAIRS[args.pair],
        mmdet_is_baseline_method=args.pair in BASELINE_PAIRS,
        device=args.device,
        machine=machine(args.device),
        image_size=args.image_size,
        iters=args.iters,
        warmup=args.warmup,
        results=rows,
        date=time.strftime('%Y-%m-%d'))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pair', choices=sorted(PAIRS), default='dino-tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--image-size',
        type=int,
        default=None,
        help='default: 128 for *-tiny pairs, 512 otherwise')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: 128 px, batch 1, 1 call')
    parser.add_argument('--json', help='write the result here')
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.batch_sizes = 128, [1]
        args.iters, args.warmup = 1, 0
    args.image_size = args.image_size or (128 if args.pair.endswith('-tiny')
                                          else 512)
    return args


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    mmdet = 'mmdet baseline' if result['mmdet_is_baseline_method'] \
        else 'mmdet'
    for row in result['results']:
        lat, ips = row['latency_s'], row['images_per_s']
        print(f"{args.pair} batch {row['batch_size']}: {mmdet} "
              f"{lat['mmdet'] * 1e3:.0f} ms ({ips['mmdet']:.1f} img/s), ours "
              f"{lat['ours'] * 1e3:.0f} ms ({ips['ours']:.1f} img/s), "
              f"speed-up {row['speedup_vs_mmdet']:.2f}x")
    write_json(result, args.json)
    return result


if __name__ == '__main__':
    main()
