"""Training cost of the query branches: Group-, H-, Co-DINO and DDQ-DETR
against DINO, H- and Co-Deformable-DETR against their two-stage Deformable
DETR.

All variants are tiny shapes models (``configs/shapes/``) with the same
weights where they share them, trained on identical synthetic batches;
their steps are interleaved in one process and the median seconds per step
are reported with the ratio to plain DINO.  Peak memory (CPU: VmHWM, CUDA:
max allocated) is measured per variant in a fresh process.

Variants: ``dino``; ``group-k1``, ``group-k3``, ``group-k11`` (Group DETR
with K groups, folded into the batch for self-attention);
``group-k11-dense-mask`` (the same model with one (K*N)^2 masked
self-attention, as the reference implementations do it);
``group-k3-shared-anchors`` (every group on the main group's anchors, no
per-group encoder heads or encoder loss; per-group denoising kept);
``group-k3-no-group-dn`` (denoising on the main group only);
``h-dino``;
``co-dino`` (ATSS + Faster R-CNN auxiliary heads); ``ddq-detr`` (distinct
queries and the dense branch); ``deformable-detr-2stage`` (refine +
two-stage, mixed selection, look forward twice), ``h-deformable-detr``
(that plus the hybrid branch) and ``co-deformable-detr`` (that plus the
Faster R-CNN and ATSS auxiliary heads); the supervision tricks
``align-dino``, ``stable-dino`` (on DINO) and ``ms-detr`` (on the two-stage
Deformable DETR), and the combinations ``co-dino+stable``,
``ddq-detr+align`` and ``h-deformable+ms-detr`` (against the detector they
are added to).  Each variant's ratio is also reported
against its own base (``BASE``).

    python benchmarks/query_branches.py \\
        --json benchmarks/results/query_branches_cpu.json
    python benchmarks/query_branches.py --quick       # smoke run
"""
import argparse
import subprocess
import sys
import time
from os import path as osp

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train_step import (ROOT, build, machine, print_peak_training_memory,
                        synthetic_batch, time_steps, write_json)

DINO = 'configs/shapes/dino-tiny_shapes.py'
GROUP = 'configs/shapes/group-dino-tiny_shapes.py'
HYBRID = 'configs/shapes/h-dino-tiny_shapes.py'
CO = 'configs/shapes/co-dino-tiny_shapes.py'
DDQ = 'configs/shapes/ddq-detr-tiny_shapes.py'
DEFORMABLE = 'configs/shapes/deformable-detr-refine-twostage-tiny_shapes.py'
H_DEFORMABLE = 'configs/shapes/h-deformable-detr-tiny_shapes.py'
CO_DEFORMABLE = 'configs/shapes/co-deformable-detr-tiny_shapes.py'
# name -> (config, model overrides)
VARIANTS = {
    'dino': (DINO, {}),
    'group-k1': (GROUP, {
        'branches.0.num_groups': 1
    }),
    'group-k3': (GROUP, {
        'branches.0.num_groups': 3
    }),
    'group-k11': (GROUP, {
        'branches.0.num_groups': 11
    }),
    'group-k11-dense-mask': (GROUP, {
        'branches.0.num_groups': 11,
        'dense_self_attn_mask': True
    }),
    'group-k3-shared-anchors': (GROUP, {
        'branches.0.num_groups': 3,
        'branches.0.shared_anchors': True
    }),
    'group-k3-no-group-dn': (GROUP, {
        'branches.0.num_groups': 3,
        'branches.0.dn_cfg': None
    }),
    'h-dino': (HYBRID, {}),
    'co-dino': (CO, {}),
    'ddq-detr': (DDQ, {}),
    'deformable-detr-2stage': (DEFORMABLE, {}),
    'h-deformable-detr': (H_DEFORMABLE, {}),
    'co-deformable-detr': (CO_DEFORMABLE, {}),
    # the supervision tricks (issue #31) and their combinations
    'align-dino': ('configs/shapes/align-detr-tiny_shapes.py', {}),
    'stable-dino': ('configs/shapes/stable-dino-tiny_shapes.py', {}),
    'ms-detr': ('configs/shapes/ms-detr-tiny_shapes.py', {}),
    'co-dino+stable': ('configs/shapes/co-dino-stable-tiny_shapes.py', {}),
    'ddq-detr+align': ('configs/shapes/ddq-detr-align-tiny_shapes.py', {}),
    'h-deformable+ms-detr':
    ('configs/shapes/h-deformable-ms-detr-tiny_shapes.py', {}),
}
# the model each variant adds its branches to
BASE = dict({name: 'dino'
             for name in VARIANTS}, **{
                 'deformable-detr-2stage': 'deformable-detr-2stage',
                 'h-deformable-detr': 'deformable-detr-2stage',
                 'co-deformable-detr': 'deformable-detr-2stage',
                 'ms-detr': 'deformable-detr-2stage',
                 'co-dino+stable': 'co-dino',
                 'ddq-detr+align': 'ddq-detr',
                 'h-deformable+ms-detr': 'h-deformable-detr'
             })


def load_config(name):
    from mmengine.config import Config
    path, overrides = VARIANTS[name]
    cfg = Config.fromfile(osp.join(ROOT, path))
    cfg.merge_from_dict({f'model.{k}': v for k, v in overrides.items()})
    cfg.model.backbone.init_cfg = None
    return cfg


def build_variants(names, device):
    """Every variant, loaded with its base's weights where they fit."""
    torch.manual_seed(0)
    models = {name: build(load_config(name), device) for name in names}
    for name, (model, _) in models.items():
        base = models.get(BASE[name], models[names[0]])[0].state_dict()
        own = model.state_dict()
        model.load_state_dict(
            {
                k: v
                for k, v in base.items()
                if k in own and own[k].shape == v.shape
            },
            strict=False)
    return models


def peak_memory_mb(args, name):
    cmd = [
        sys.executable, __file__, '--memory-of', name, '--image-size',
        str(args.image_size), '--batch-size',
        str(args.batch_size), '--num-gts',
        str(args.num_gts), '--device', args.device
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_memory_only(args):
    print_peak_training_memory(load_config(args.memory_of), args, steps=2)


def run(args):
    models = build_variants(args.variants, args.device)
    batch = synthetic_batch(args.image_size, args.batch_size, args.num_gts, 0,
                            args.device)
    seconds = time_steps(models, batch, args.iters, args.warmup, args.device)
    base = seconds['dino'] if 'dino' in seconds else None
    result = dict(
        device=args.device,
        machine=machine(args.device),
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_gts=args.num_gts,
        iters=args.iters,
        warmup=args.warmup,
        variants={n: VARIANTS[n]
                  for n in args.variants},
        seconds_per_step=seconds,
        date=time.strftime('%Y-%m-%d'))
    if base:
        result['time_ratio_vs_dino'] = {
            n: s / base
            for n, s in seconds.items()
        }
    result['time_ratio_vs_base'] = {
        n: s / seconds[BASE[n]]
        for n, s in seconds.items() if BASE[n] in seconds
    }
    if not args.skip_memory:
        memory = {n: peak_memory_mb(args, n) for n in args.variants}
        result['peak_memory_mb'] = memory
        if 'dino' in memory:
            result['memory_ratio_vs_dino'] = {
                n: m / memory['dino']
                for n, m in memory.items()
            }
        result['memory_ratio_vs_base'] = {
            n: m / memory[BASE[n]]
            for n, m in memory.items() if BASE[n] in memory
        }
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--variants',
        nargs='+',
        choices=list(VARIANTS),
        default=list(VARIANTS))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--image-size', type=int, default=128)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--num-gts', type=int, default=7)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: batch 1, 1 step, no memory')
    parser.add_argument('--json', help='write the result here')
    parser.add_argument(
        '--memory-of', choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.iters, args.warmup = 1, 1, 0
        args.skip_memory = True
    if args.variants[0] != 'dino' and 'dino' in args.variants:
        args.variants.remove('dino')
        args.variants.insert(0, 'dino')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:
        return measure_memory_only(args)
    result = run(args)
    for name, secs in result['seconds_per_step'].items():
        line = f'{name:22s} {secs * 1e3:7.0f} ms/step'
        if 'time_ratio_vs_dino' in result:
            line += f"  x{result['time_ratio_vs_dino'][name]:.2f} time"
        if 'memory_ratio_vs_dino' in result:
            line += (f"  {result['peak_memory_mb'][name]:6.0f} MB"
                     f"  x{result['memory_ratio_vs_dino'][name]:.2f} memory")
        if BASE[name] != 'dino' and name in result['time_ratio_vs_base']:
            line += (f"  vs {BASE[name]}: "
                     f"x{result['time_ratio_vs_base'][name]:.2f} time")
            if 'memory_ratio_vs_base' in result:
                line += f" x{result['memory_ratio_vs_base'][name]:.2f} memory"
        print(line)
    write_json(result, args.json)
    return result


if __name__ == '__main__':
    main()
