"""Export a DETR+ detector to ONNX (standard operators, runs in ONNX Runtime).

    python tools/deployment/export_onnx.py CONFIG CHECKPOINT --out model.onnx
    python tools/deployment/export_onnx.py CONFIG CHECKPOINT \\
        --out model.onnx --shape 800 1333 --opset 18 --verify

The file takes the preprocessed batch ``input`` (B, 3, H, W) float32 (the
config's data preprocessor output: normalised, BGR->RGB as configured) and
returns ``dets`` (B, K, 5) (x1, y1, x2, y2 in input pixels, score) and
``labels`` (B, K) (-1 for empty rows), K = ``test_cfg.max_per_img`` (DDQ FCN:
``num_distinct_queries``).  Batch
and image size are dynamic unless ``--static-batch`` / ``--static-size``.
Needs the deploy extra: ``pip install "projects_detr_plus[deploy]"``.
"""
import argparse
import os.path as osp
import sys
import time

import torch
from mmengine.config import DictAction

sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from projects_detr_plus.deployment.utils import build_detector, verify_export
from projects_detr_plus.ops.onnx_lowering import MSDA_MODES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Export a DETR+ detector to ONNX')
    parser.add_argument('config', help='model config file')
    parser.add_argument(
        'checkpoint',
        help='checkpoint file; "none" for random weights '
        '(checks only)')
    parser.add_argument('--out', required=True, help='the .onnx file')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=[640, 640],
        metavar=('H', 'W'),
        help='example input size the model is traced with; '
        'the only size accepted with --static-size')
    parser.add_argument(
        '--batch',
        type=int,
        default=2,
        help='example batch size (the only one accepted '
        'with --static-batch)')
    parser.add_argument(
        '--static-batch',
        action='store_true',
        help='fix the batch size to --batch')
    parser.add_argument(
        '--static-size',
        action='store_true',
        help='fix the image size to --shape')
    parser.add_argument(
        '--size-divisor',
        type=int,
        default=None,
        help='dynamic heights and widths are multiples of '
        'this (default: any size, or 32 where torch.export '
        'needs it, e.g. Swin backbones)')
    parser.add_argument(
        '--opset',
        type=int,
        default=18,
        help='ONNX opset (>= 16, for GridSample)')
    parser.add_argument(
        '--msda',
        choices=MSDA_MODES,
        default='decompose',
        help='MSDeformAttn as standard ONNX operators: '
        'one GridSample per level (decompose, the default) '
        'or Gather + MatMul without GridSample (gather); or '
        'one detr_plus.MSDeformAttn node for runtimes with '
        'their own kernel (custom)')
    parser.add_argument(
        '--no-optimize',
        action='store_true',
        help="skip the exporter's graph optimisation")
    parser.add_argument(
        '--verify',
        action='store_true',
        help='run the file in ONNX Runtime on a random batch '
        'and compare with PyTorch predict')
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as tools/train.py')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from projects_detr_plus.deployment import export_onnx
    checkpoint = None if args.checkpoint.lower() == 'none' else \
        args.checkpoint
    model = build_detector(args.config, checkpoint, args.device,
                           args.cfg_options)
    shape = (args.batch, 3, *args.shape)
    start = time.time()
    export_onnx(
        model,
        args.out,
        input_shape=shape,
        dynamic_batch=not args.static_batch,
        dynamic_size=not args.static_size,
        opset=args.opset,
        msda=args.msda,
        optimize=not args.no_optimize,
        size_divisor=args.size_divisor,
        metadata={'detr_plus.config': osp.basename(args.config)})
    print(f'exported {type(model).__name__} ({osp.basename(args.config)}) '
          f'to {args.out} in {time.time() - start:.1f} s (opset '
          f'{args.opset}, MSDeformAttn: {args.msda}, batch '
          f'{"static" if args.static_batch else "dynamic"}, size '
          f'{"static" if args.static_size else "dynamic"})')
    if args.verify:
        if args.msda == 'custom':
            print('--verify skipped: ONNX Runtime has no kernel for the '
                  'custom MSDeformAttn node')
            return 0
        report = verify_export(model, args.out, shape)
        print(report['summary'])
        return 0 if report['ok'] else 1
    return 0


if __name__ == '__main__':
    with torch.no_grad():
        sys.exit(main())
