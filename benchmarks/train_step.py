"""Training-step time and peak memory: a DETR+ config against mmdet's.

Both models are built in one process with the same weights (ours loads mmdet's
state dict) and fed identical synthetic batches; steps alternate between the
two models (warm-up excluded) and the median seconds per step are reported
with their ratio.  Peak memory is measured per model in a fresh subprocess
(CPU: peak RSS, VmHWM; CUDA: ``torch.cuda.max_memory_allocated``).

    python benchmarks/train_step.py --pair dino-tiny --json out.json
    python benchmarks/train_step.py --pair dino-r50 --image-size 512 \\
        --batch-size 2
    python benchmarks/train_step.py --quick        # smoke run
"""
import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from os import path as osp

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (our config, mmdet's config for the same model)
PAIRS = {
    'dino-tiny': ('configs/shapes/dino-tiny_shapes.py', None),
    'deformable-detr-tiny':
    ('configs/shapes/deformable-detr-tiny_shapes.py', None),
    'dino-r50': ('configs/dino/dino-4scale_r50_8xb2-12e_coco.py',
                 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'),
    'ddq-detr-tiny': ('configs/shapes/ddq-detr-tiny_shapes.py', None),
    'ddq-detr-r50': ('configs/ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py',
                     'mmdet::ddq/ddq-detr-4scale_r50_8xb2-12e_coco.py'),
    'deformable-detr-r50':
    ('configs/deformable_detr/deformable-detr_r50_16xb2-50e_coco.py',
     'mmdet::deformable_detr/deformable-detr_r50_16xb2-50e_coco.py'),
    'deformable-detr-refine-twostage-r50':
    ('configs/deformable_detr/'
     'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
     'mmdet::deformable_detr/'
     'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'),
    # DDQ FCN / R-CNN have no mmdet model: timed against mmdet's baseline
    # of each (a different model, so no shared weights)
    'ddq-fcn-tiny': ('configs/shapes/ddq-fcn-tiny_shapes.py',
                     'configs/shapes/atss-tiny_shapes.py'),
    'ddq-rcnn-tiny': ('configs/shapes/ddq-rcnn-tiny_shapes.py',
                      'configs/shapes/sparse-rcnn-tiny_shapes.py'),
    'ddq-fcn-r50': ('configs/ddq_fcn/ddq-fcn_r50_1x_coco.py',
                    'mmdet::atss/atss_r50_fpn_1x_coco.py'),
    'ddq-rcnn-r50': ('configs/ddq_rcnn/ddq-rcnn_r50_1x_coco.py',
                     'mmdet::sparse_rcnn/sparse-rcnn_r50_fpn_1x_coco.py'),
}
# pairs whose mmdet model is another method's (its baseline), not ours
BASELINE_PAIRS = {
    'ddq-fcn-tiny', 'ddq-rcnn-tiny', 'ddq-fcn-r50', 'ddq-rcnn-r50'
}
MMDET_TYPES = {
    'DINOPlus': 'DINO',
    'DeformableDETRPlus': 'DeformableDETR',
    'DDQDETRPlus': 'DDQDETR',
    'DDQHeadPlus': 'DDQDETRHead',
    'OneToOneAssigner': 'HungarianAssigner'
}


def to_mmdet_model_cfg(model_cfg):
    """mmdet's equivalent of one of our model configs (types swapped back)."""

    def convert(node):
        if isinstance(node, dict):
            node = {k: convert(v) for k, v in node.items()}
            if node.get('type') == 'MultiScaleDeformableAttentionPlus':
                node.pop('type')
            elif node.get('type') in MMDET_TYPES:
                node['type'] = MMDET_TYPES[node['type']]
            if isinstance(node.get('dn_cfg'), dict):
                node['dn_cfg'].pop('max_targets', None)
            node.pop('suppressed_queries', None)  # DDQ: ours only
            return node
        if isinstance(node, (list, tuple)):
            return type(node)(convert(v) for v in node)
        return node

    return convert(copy.deepcopy(model_cfg))


def set_embed_dims(model_cfg, dims):
    """Change a DETR model config's width to ``dims`` everywhere."""

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == 'embed_dims':
                    node[key] = dims
                else:
                    visit(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                visit(value)

    visit(model_cfg)
    model_cfg.neck.out_channels = dims
    model_cfg.positional_encoding.num_feats = dims // 2


def load_configs(pair):
    """Our config and mmdet's for ``pair``.

    For the tiny shapes pairs, mmdet's model is derived from ours by swapping
    the types back; mmdet's DINO decoder only works at embed_dims=256, so
    both models of the ``dino-tiny`` pair are widened to 256.
    """
    from mmengine.config import Config
    ours_path, mmdet_path = PAIRS[pair]
    ours = Config.fromfile(osp.join(ROOT, ours_path))
    if pair == 'dino-tiny':
        set_embed_dims(ours.model, 256)
    if mmdet_path is None:
        reference = copy.deepcopy(ours)
        reference.model = to_mmdet_model_cfg(ours.model.to_dict())
    elif not mmdet_path.startswith('mmdet::'):
        reference = Config.fromfile(osp.join(ROOT, mmdet_path))
    else:
        from mmengine.hub import get_config
        reference = get_config(mmdet_path)
    for cfg in (ours, reference):
        cfg.model.backbone.init_cfg = None  # no pretrained weights offline
    return dict(ours=ours, mmdet=reference)


def build(cfg, device):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    model = MODELS.build(copy.deepcopy(cfg.model)).to(device)
    model.init_weights()
    model.train()
    return model, build_optim_wrapper(model, copy.deepcopy(cfg.optim_wrapper))


def synthetic_batch(image_size, batch_size, num_gts, seed, device):
    """Identical random images and boxes for both models."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    gen = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append((torch.rand(3, image_size, image_size, generator=gen) *
                       255).to(torch.uint8).to(device))
        xy = torch.rand(num_gts, 2, generator=gen) * image_size * 0.7
        wh = torch.rand(num_gts, 2, generator=gen) * image_size * 0.3 + 8
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(image_size, image_size),
                ori_shape=(image_size, image_size),
                scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, (xy + wh).clamp(max=image_size)], 1),
            labels=torch.randint(0, 6, (num_gts, ), generator=gen)).to(device)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _sync(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def time_steps(models, batch, iters, warmup, device):
    """Median seconds per train step of each model, steps interleaved."""
    times = {name: [] for name in models}
    for step in range(warmup + iters):
        for name, (model, optim) in models.items():
            torch.manual_seed(step)
            _sync(device)
            start = time.perf_counter()
            model.train_step(copy.deepcopy(batch), optim)
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_mb(args, which):
    """Peak memory of training ``which`` alone, in a fresh process."""
    cmd = [
        sys.executable, __file__, '--pair', args.pair, '--memory-of', which,
        '--image-size',
        str(args.image_size), '--batch-size',
        str(args.batch_size), '--num-gts',
        str(args.num_gts), '--iters',
        str(max(2, args.warmup + 1)), '--device', args.device
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_memory_only(args):
    print_peak_training_memory(
        load_configs(args.pair)[args.memory_of], args, steps=args.iters)


def print_peak_training_memory(cfg, args, steps):
    """Train ``cfg`` for ``steps`` steps on a synthetic batch (``args``:
    image_size, batch_size, num_gts, device); print the peak memory in MB
    for the parent process to read."""
    model, optim = build(cfg, args.device)
    batch = synthetic_batch(args.image_size, args.batch_size, args.num_gts, 0,
                            args.device)
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        model.train_step(copy.deepcopy(batch), optim)
    if args.device.startswith('cuda'):
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print(peak_rss_mb())


def peak_rss_mb():
    """This process's peak RSS.  (``ru_maxrss`` would not do: Linux keeps
    the parent's peak across fork + exec.)"""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device):
    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine())
    if device.startswith('cuda'):
        info['gpu'] = torch.cuda.get_device_name()
    return info


def run(args):
    configs = load_configs(args.pair)
    torch.manual_seed(0)
    reference = build(configs['mmdet'], args.device)
    ours = build(configs['ours'], args.device)
    if args.pair not in BASELINE_PAIRS:
        ours[0].load_state_dict(reference[0].state_dict(), strict=True)
    batch = synthetic_batch(args.image_size, args.batch_size, args.num_gts, 0,
                            args.device)
    seconds = time_steps(
        dict(mmdet=reference, ours=ours), batch, args.iters, args.warmup,
        args.device)
    result = dict(
        pair=args.pair,
        configs=PAIRS[args.pair],
        mmdet_is_baseline_method=args.pair in BASELINE_PAIRS,
        device=args.device,
        machine=machine(args.device),
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_gts=args.num_gts,
        iters=args.iters,
        warmup=args.warmup,
        seconds_per_step=seconds,
        speedup_vs_mmdet=seconds['mmdet'] / seconds['ours'],
        date=time.strftime('%Y-%m-%d'))
    if not args.skip_memory:
        memory = {name: peak_memory_mb(args, name) for name in seconds}
        result['peak_memory_mb'] = memory
        result['memory_ratio_vs_mmdet'] = memory['ours'] / memory['mmdet']
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pair', choices=sorted(PAIRS), default='dino-tiny')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--image-size',
        type=int,
        default=None,
        help='default: 128 for *-tiny pairs, 512 otherwise')
    parser.add_argument(
        '--batch-size',
        type=int,
        default=None,
        help='default: 8 for *-tiny pairs, 2 otherwise')
    parser.add_argument('--num-gts', type=int, default=10)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--skip-memory', action='store_true')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: 128 px, batch 1, 1 step, no memory')
    parser.add_argument('--json', help='write the result here')
    parser.add_argument(
        '--memory-of', choices=['ours', 'mmdet'], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tiny = args.pair.endswith('-tiny')
    if args.quick:
        args.image_size, args.batch_size = 128, 1
        args.iters, args.warmup, args.skip_memory = 1, 0, True
    args.image_size = args.image_size or (128 if tiny else 512)
    args.batch_size = args.batch_size or (8 if tiny else 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.memory_of:
        return measure_memory_only(args)
    result = run(args)
    seconds = result['seconds_per_step']
    mmdet = 'mmdet baseline' if result['mmdet_is_baseline_method'] \
        else 'mmdet'
    print(f"{result['pair']} on {args.device} ({args.image_size}px, batch "
          f"{args.batch_size}): {mmdet} {seconds['mmdet'] * 1e3:.0f} ms/step,"
          f" ours {seconds['ours'] * 1e3:.0f} ms/step, speed-up "
          f"{result['speedup_vs_mmdet']:.2f}x")
    if 'peak_memory_mb' in result:
        memory = result['peak_memory_mb']
        print(f"peak memory: mmdet {memory['mmdet']:.0f} MB, ours "
              f"{memory['ours']:.0f} MB (ratio "
              f"{result['memory_ratio_vs_mmdet']:.2f})")
    write_json(result, args.json)
    return result


def write_json(result, path):
    """Write a benchmark result to ``path`` (nothing when path is None)."""
    if path:
        with open(path, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
