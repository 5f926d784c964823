"""ONNX Runtime (CPU) against PyTorch: inference latency of exported DETRs.

For each model the config's detector (random weights, seed 0) is exported
with ``projects_detr_plus.deployment.export_onnx`` (dynamic batch and size,
MSDeformAttn as standard ONNX operators: one file per ``--msda`` mode,
``decompose`` (GridSample) and/or ``gather`` (Gather + MatMul)) and, in the
same process, on the same preprocessed batches, the calls are interleaved:
PyTorch ``model.predict(rescale=False)`` (backbone, transformer,
post-processing; ``torch.no_grad``) and ONNX Runtime ``session.run`` of each
file (same work, same outputs: checked on the first batch).  Median latency
per batch after warm-up, with as many ONNX Runtime intra-op threads as torch
threads (not spinning when idle, which would slow the interleaved PyTorch
calls).  One result row per batch size and mode, its ``msda`` field naming
the mode (the PyTorch time of the modes of a batch size is the same).

    python benchmarks/onnx_runtime.py \
        --json benchmarks/results/onnx_runtime_cpu.json
    python benchmarks/onnx_runtime.py --models dino-tiny --batch-sizes 1 8 \
        --msda decompose gather
    python benchmarks/onnx_runtime.py --quick
"""
import argparse
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from machine import describe  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {
    'dino-tiny': ('configs/shapes/dino-tiny_shapes.py', 128),
    'dino-r50': ('configs/dino/dino-4scale_r50_8xb2-12e_coco.py', 512),
}
PACKAGES = ('torch', 'onnx', 'onnxruntime', 'onnxscript', 'mmdet', 'mmcv',
            'mmengine', 'numpy')


def time_calls(calls, iters, warmup):
    """Median seconds of each zero-argument call, calls interleaved."""
    times = {name: [] for name in calls}
    for step in range(warmup + iters):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def export_files(model, name, size, args, folder):
    """``{mode: (onnx file, export seconds or None)}``: one export per
    ``--msda`` mode, or the ``--onnx`` file (its mode from its metadata)."""
    from projects_detr_plus.deployment import OnnxDetector, export_onnx
    if args.onnx:
        mode = OnnxDetector(args.onnx).metadata.get('detr_plus.msda',
                                                    'decompose')
        return {mode: (args.onnx, None)}
    files = {}
    for mode in args.msda:
        onnx_file = osp.join(folder, f'{name}_{mode}.onnx')
        start = time.perf_counter()
        export_onnx(
            model, onnx_file, input_shape=(2, 3, size, size), msda=mode)
        files[mode] = (onnx_file, time.perf_counter() - start)
    return files


def result_row(batch_size, mode, pytorch_s, onnxruntime_s):
    """One JSON row: a batch size and an MSDeformAttn mode."""
    seconds = dict(pytorch=pytorch_s, onnxruntime=onnxruntime_s)
    return dict(
        batch_size=batch_size,
        msda=mode,
        latency_ms={
            k: v * 1000
            for k, v in seconds.items()
        },
        images_per_s={
            k: batch_size / v
            for k, v in seconds.items()
        },
        speedup_vs_pytorch=pytorch_s / onnxruntime_s)


def bench_model(name, args, folder):
    """Export one model (per mode) and time PyTorch and every file at every
    batch size, all calls of a batch size interleaved."""
    from projects_detr_plus.deployment import OnnxDetector
    from projects_detr_plus.deployment.utils import (build_detector,
                                                     reference_predictions,
                                                     verify_export)
    config, size = MODELS[name]
    size = args.image_size or size
    model = build_detector(osp.join(ROOT, config))
    files = export_files(model, name, size, args, folder)
    exports, sessions = {}, {}
    for mode, (onnx_file, export_s) in files.items():
        # random weights: near-equal proposal scores may be ranked
        # differently by the two runtimes, which changes a few detections
        # (reported)
        check = verify_export(model, onnx_file, (1, 3, size, size))
        print(f'[{mode}] {check["summary"]}', flush=True)
        exports[mode] = dict(
            export_s=export_s,
            onnx_mb=osp.getsize(onnx_file) / 2**20,
            check_ok=check['ok'],
            check=check['summary'])
        # no spinning: idle ONNX Runtime threads would spin on the cores
        # the interleaved PyTorch calls need
        sessions[mode] = OnnxDetector(
            onnx_file, threads=torch.get_num_threads(), spinning=False)
    rows = []
    for batch_size in args.batch_sizes:
        inputs = torch.randn(
            batch_size,
            3,
            size,
            size,
            generator=torch.Generator().manual_seed(1))
        array = inputs.numpy()
        calls = dict(pytorch=lambda: reference_predictions(model, inputs))
        for mode, session in sessions.items():
            calls[mode] = lambda session=session: session(array)
        seconds = time_calls(calls, args.iters, args.warmup)
        for mode in sessions:
            rows.append(
                result_row(batch_size, mode, seconds['pytorch'],
                           seconds[mode]))
            print(
                f'{name} {size}x{size} batch {batch_size}: PyTorch '
                f'{seconds["pytorch"] * 1000:.0f} ms, ONNX Runtime '
                f'[{mode}] {seconds[mode] * 1000:.0f} ms '
                f'({rows[-1]["speedup_vs_pytorch"]:.2f}x)',
                flush=True)
    return dict(
        model=name,
        config=config,
        image_size=size,
        msda=list(files),
        exports=exports,
        results=rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--models',
        nargs='+',
        choices=sorted(MODELS),
        default=['dino-tiny', 'dino-r50'])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument(
        '--image-size',
        type=int,
        default=None,
        help='default: 128 for dino-tiny, 512 for dino-r50')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument(
        '--warmup',
        type=int,
        default=3,
        help='untimed rounds (PyTorch needs a few)')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='torch and ONNX Runtime threads (default: '
        "torch's); 1 is the least disturbed by other load")
    parser.add_argument(
        '--msda',
        nargs='+',
        choices=('decompose', 'gather'),
        default=['decompose'],
        help='MSDeformAttn lowering(s) to export and '
        'time, interleaved (default: decompose)')
    parser.add_argument(
        '--onnx',
        help='time this exported file (of the '
        'first model, same config and seed-0 weights; its '
        'msda mode from its metadata) instead of exporting')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='smoke run: dino-tiny, batch 1, 1 call')
    parser.add_argument('--json', help='write the result here')
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes = ['dino-tiny'], [1]
        args.iters, args.warmup = 1, 0
    if args.onnx and len(args.models) != 1:
        parser.error('--onnx takes one model')
    return args


def main(argv=None):
    import json
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = [bench_model(name, args, folder) for name in args.models]
    result = dict(
        machine=describe(PACKAGES),
        iters=args.iters,
        warmup=args.warmup,
        date=time.strftime('%Y-%m-%d'),
        models=rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    with torch.no_grad():
        main()
