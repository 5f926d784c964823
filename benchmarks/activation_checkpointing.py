"""Peak training memory with and without activation checkpointing.

Official Co-DINO trains with ``with_cp=4`` (the first 4 encoder layers
recompute their activations in the backward pass; ours: the encoder's /
decoder's ``num_cp``, through ``torch.utils.checkpoint``).  Each setting
trains a few steps of the same model on the same synthetic batch in a fresh
process; the peak memory (CPU: peak RSS; CUDA: max allocated) and the
seconds per step are printed with their ratios to no checkpointing.

    python benchmarks/activation_checkpointing.py \\
        --json benchmarks/results/activation_checkpointing_co-dino-r50_cpu.json
    python benchmarks/activation_checkpointing.py --quick   # smoke run
"""
import argparse
import copy
import json
import subprocess
import sys
import time
from os import path as osp

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train_step import build, machine, peak_rss_mb, synthetic_batch  # noqa

CONFIGS = {
    'co-dino-r50': 'configs/co_detr/co-dino-5scale_r50_8xb2-12e_coco.py',
    'co-dino-tiny': 'configs/shapes/co-dino-tiny_shapes.py',
}
# setting -> (encoder num_cp, decoder num_cp); None: all layers
SETTINGS = {
    'none': (-1, -1),
    'encoder-4 (official)': (4, -1),
    'encoder+decoder (all)': (None, None),
}


def load_config(name, setting):
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[name]))
    cfg.model.backbone.init_cfg = None  # no pretrained weights offline
    for part, num_cp in zip(('encoder', 'decoder'), SETTINGS[setting]):
        layers = cfg.model[part].num_layers
        cfg.model[part].num_cp = layers if num_cp is None else min(
            num_cp, layers)
    return cfg


def measure(args):
    """Train ``args.setting``; print peak MB and seconds per step."""
    torch.manual_seed(0)
    model, optim = build(load_config(args.config, args.setting), args.device)
    batch = synthetic_batch(args.image_size, args.batch_size, args.num_gts, 0,
                            args.device)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps):
        torch.manual_seed(step)
        start = time.perf_counter()
        model.train_step(copy.deepcopy(batch), optim)
        if args.device.startswith('cuda'):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() /
        2**20 if args.device.startswith('cuda') else peak_rss_mb())
    print(json.dumps(dict(peak_mb=peak, seconds=min(times[1:] or times))))


def run_setting(args, setting):
    cmd = [
        sys.executable, __file__, '--measure', '--setting', setting,
        '--config', args.config, '--image-size',
        str(args.image_size), '--batch-size',
        str(args.batch_size), '--num-gts',
        str(args.num_gts), '--steps',
        str(args.steps), '--device', args.device
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f'{setting} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--config', choices=list(CONFIGS), default='co-dino-r50')
    parser.add_argument('--image-size', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--num-gts', type=int, default=10)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', help='write the result here')
    parser.add_argument(
        '--quick', action='store_true', help='tiny model, 128 px, 1 step')
    parser.add_argument(
        '--measure', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--setting', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.image_size, args.steps = 'co-dino-tiny', 128, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        return measure(args)
    results = {s: run_setting(args, s) for s in SETTINGS}
    base = results['none']
    for r in results.values():
        r['memory_ratio'] = r['peak_mb'] / base['peak_mb']
        r['time_ratio'] = r['seconds'] / base['seconds']
    result = dict(
        config=CONFIGS[args.config],
        image_size=args.image_size,
        batch_size=args.batch_size,
        device=args.device,
        machine=machine(args.device),
        settings=results)
    print('| checkpointing | peak MB | vs none | s/step | vs none |')
    print('|---|---|---|---|---|')
    for name, r in results.items():
        print(f"| {name} | {r['peak_mb']:.0f} | {r['memory_ratio']:.2f} | "
              f"{r['seconds']:.2f} | {r['time_ratio']:.2f} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
