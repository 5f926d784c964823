"""Peak memory of a DINO training step on crowded images (mmdet #11021).

mmdet's denoising makes 2 queries per ground truth and group, so an image
with hundreds of boxes blows up the decoder; ours caps the denoised boxes
(``dn_cfg.max_targets``).  For each GT count, each model trains alone in a
fresh process on a synthetic batch (tiny shapes DINO widened to 256, as
``train_step.py --pair dino-tiny``) and its peak memory is reported.

    python benchmarks/crowded_memory.py \\
        --json benchmarks/results/crowded_memory_cpu.json
"""
import argparse
import sys
import time
from os import path as osp

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import train_step  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num-gts', nargs='+', type=int, default=[5, 500])
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json')
    args = parser.parse_args(argv)
    memory = {}
    for num_gts in args.num_gts:
        step_args = train_step.parse_args([
            '--pair', 'dino-tiny', '--num-gts',
            str(num_gts), '--batch-size',
            str(args.batch_size), '--warmup', '1', '--device', args.device
        ])
        memory[num_gts] = {
            which: train_step.peak_memory_mb(step_args, which)
            for which in ('ours', 'mmdet')
        }
        print(f"{num_gts:4d} boxes/image: ours {memory[num_gts]['ours']:.0f}"
              f" MB, mmdet {memory[num_gts]['mmdet']:.0f} MB")
    low, high = min(memory), max(memory)
    growth = {
        which: memory[high][which] / memory[low][which]
        for which in ('ours', 'mmdet')
    }
    print(f'growth from {low} to {high} boxes: ours x{growth["ours"]:.2f}, '
          f'mmdet x{growth["mmdet"]:.2f}')
    result = dict(
        device=args.device,
        machine=train_step.machine(args.device),
        batch_size=args.batch_size,
        image_size=128,
        peak_memory_mb=memory,
        growth=growth,
        date=time.strftime('%Y-%m-%d'))
    train_step.write_json(result, args.json)
    return result


if __name__ == '__main__':
    main()
