"""Golden values of every shipped model config: the guard of refactors.

For each config under ``configs/`` that defines a model (COCO configs at a
small size: ResNet-18, 256 px), on fixed weights and inputs, fp32, one
thread, the op on its PyTorch path:

* every loss key of ``model.loss`` (the random parts seeded);
* the gradient norm of every parameter (of the sum of the losses);
* ``predict``'s first ``NUM_PREDICTIONS`` boxes, scores and labels per image.

Weights do not depend on the order modules are built in: each parameter is
drawn from a generator seeded by its state-dict key, so a refactor that
moves modules but keeps their keys keeps the numbers.

``python tests/golden_values.py [--only SUBSTRING]`` records them into
``tests/golden/``; ``tests/test_golden_values.py`` compares.
"""
import argparse
import copy
import glob
import json
import math
import os
import os.path as osp
import time
import zlib

import torch
from torch import nn

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
GOLDEN_DIR = osp.join(REPO_ROOT, 'tests', 'golden')
COCO_SIZE = 256
# H-DETR's 1500 (+ 300 or 900) queries need more encoder tokens than 256 px
# gives (1360 on 4 levels)
HYBRID_SIZE = 352
NUM_PREDICTIONS = 50
LOSS_SEED = 2026
RTOL = 1e-6


def config_paths():
    """Relative paths of every config whose model is one of ours (the
    baselines of stock mmdet models are left out)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config

    import projects_detr_plus  # noqa: F401
    found = []
    for path in sorted(glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py'))):
        cfg = Config.fromfile(path)
        if 'model' not in cfg or 'type' not in cfg.model:
            continue
        model_type = MODELS.get(cfg.model.type)
        if model_type.__module__.startswith('projects_detr_plus'):
            found.append(osp.relpath(path, osp.join(REPO_ROOT, 'configs')))
    return found


def golden_file(config):
    return osp.join(GOLDEN_DIR, config.replace('/', '__')[:-3] + '.json')


def _small_backbone(model_cfg):
    """A COCO model on a ResNet-18 with the original's outputs."""
    backbone = model_cfg.backbone
    indices = tuple(backbone.get('out_indices', (0, 1, 2, 3)))
    small = dict(
        type='ResNet',
        depth=18,
        num_stages=4,
        out_indices=indices,
        frozen_stages=backbone.get('frozen_stages', 1),
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=None)
    if backbone.type == 'ResNet':
        small.update(
            norm_cfg=backbone.get('norm_cfg', small['norm_cfg']),
            norm_eval=backbone.get('norm_eval', True))
    model_cfg.backbone = small
    model_cfg.neck.in_channels = [64 * 2**i for i in indices]


def _seeded_weights(model):
    """Every parameter drawn from a generator seeded by its key."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if param.dim() > 1:
                fan = param.shape[0] + param[0].numel()
                bound = math.sqrt(6.0 / fan)
                value = torch.rand(param.shape, generator=gen) * 2 - 1
                value = value * bound
            elif name.endswith(('weight', 'scale')):  # norms, Scale
                value = 1 + 0.1 * torch.randn(param.shape, generator=gen)
            else:
                value = 0.1 * torch.randn(param.shape, generator=gen)
            param.copy_(value)


def build_model(config):
    """The config's model, small for COCO, fixed weights, no dropout."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    register_all_modules(init_default_scope=True)
    import projects_detr_plus  # noqa: F401
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', config))
    model_cfg = copy.deepcopy(cfg.model)
    if not config.startswith('shapes/'):
        _small_backbone(model_cfg)
    elif model_cfg.backbone.get('init_cfg'):
        model_cfg.backbone.init_cfg = None
    model = MODELS.build(model_cfg)
    _seeded_weights(model)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def make_inputs(config, num_classes):
    """Two preprocessed images (the second one padded) and their targets."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    size = 128 if config.startswith('shapes/') else (
        HYBRID_SIZE if config.startswith('h_detr/') else COCO_SIZE)
    gen = torch.Generator().manual_seed(zlib.crc32(config.encode()))
    inputs = torch.randn(2, 3, size, size, generator=gen)
    shapes = [(size, size), (size * 7 // 8, size * 15 // 16)]
    inputs[1, :, shapes[1][0]:] = 0
    inputs[1, :, :, shapes[1][1]:] = 0
    samples = []
    for (h, w), count in zip(shapes, (4, 7)):
        sample = DetDataSample(
            metainfo=dict(
                img_id=len(samples),
                img_shape=(h, w),
                ori_shape=(h, w),
                scale_factor=(1.0, 1.0),
                batch_input_shape=(size, size),
                pad_shape=(size, size)))
        scale = torch.tensor([w, h], dtype=torch.float32)
        xy = torch.rand(count, 2, generator=gen) * scale * 0.7
        wh = (torch.rand(count, 2, generator=gen) * 0.3 + 0.05) * scale
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, torch.minimum(xy + wh, scale)], 1),
            labels=torch.randint(0, num_classes, (count, ), generator=gen))
        samples.append(sample)
    return inputs, samples


def _num_classes(model):
    for head in ('bbox_head', 'rpn_head'):
        if hasattr(getattr(model, head, None), 'num_classes'):
            return getattr(model, head).num_classes
    return model.roi_head.bbox_head[0].num_classes


def _scalar_losses(losses):
    """Loss name -> float (lists as ``name.i``) and mmdet's total loss."""
    values, total = {}, 0
    for key, value in losses.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            name = key if len(items) == 1 else f'{key}.{i}'
            values[name] = float(item.detach())
            if 'loss' in key:
                total = total + item
    return values, total


def compute(config):
    """The golden values of one config (see the module docstring)."""
    from projects_detr_plus.ops import force_pytorch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_pytorch():
            return _compute(config)
    finally:
        torch.set_num_threads(threads)


def _compute(config):
    model = build_model(config)
    inputs, samples = make_inputs(config, _num_classes(model))
    model.train()
    torch.manual_seed(LOSS_SEED)
    losses, total = _scalar_losses(model.loss(inputs, copy.deepcopy(samples)))
    total.backward()
    grads = {
        name: (None if p.grad is None else float(p.grad.norm()))
        for name, p in model.named_parameters()
    }
    model.eval()
    with torch.no_grad():
        predictions = []
        for sample in model.predict(inputs, copy.deepcopy(samples)):
            pred = sample.pred_instances
            predictions.append(
                dict(
                    count=len(pred),
                    bboxes=pred.bboxes[:NUM_PREDICTIONS].tolist(),
                    scores=pred.scores[:NUM_PREDICTIONS].tolist(),
                    labels=pred.labels[:NUM_PREDICTIONS].tolist()))
    return dict(
        config=config,
        losses=losses,
        grad_norms=grads,
        predictions=predictions)


def differences(expected, actual, rtol=RTOL):
    """Human-readable differences between two golden records."""
    found = []

    def close(a, b):
        return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12

    for part in ('losses', 'grad_norms'):
        if set(expected[part]) != set(actual[part]):
            missing = sorted(set(expected[part]) - set(actual[part]))
            new = sorted(set(actual[part]) - set(expected[part]))
            found.append(f'{part} keys differ: missing {missing}, new {new}')
            continue
        for key, value in expected[part].items():
            other = actual[part][key]
            if (value is None) != (other
                                   is None) or (value is not None
                                                and not close(value, other)):
                found.append(f'{part}[{key}]: {value} -> {other}')
    for i, (exp, act) in enumerate(
            zip(expected['predictions'], actual['predictions'])):
        if exp['count'] != act['count'] or exp['labels'] != act['labels']:
            found.append(f'predictions[{i}]: counts or labels differ')
            continue
        for key in ('scores', 'bboxes'):
            flat_e = torch.tensor(exp[key], dtype=torch.float64).flatten()
            flat_a = torch.tensor(act[key], dtype=torch.float64).flatten()
            bad = (flat_e - flat_a).abs(
            ) > rtol * torch.maximum(flat_e.abs(), flat_a.abs()) + 1e-12
            if bad.any():
                found.append(f'predictions[{i}].{key}: {int(bad.sum())} '
                             'values differ')
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', default='', help='configs containing this')
    parser.add_argument(
        '--check',
        action='store_true',
        help='compare with the recorded values instead')
    args = parser.parse_args()
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    failed = 0
    for config in config_paths():
        if args.only not in config:
            continue
        start = time.time()
        record = compute(config)
        record['seconds'] = round(time.time() - start, 1)
        if args.check:
            with open(golden_file(config)) as f:
                diff = differences(json.load(f), record)
            failed += bool(diff)
            print(
                config,
                '\n  '.join(['DIFF'] + diff[:20]) if diff else 'OK',
                flush=True)
            continue
        with open(golden_file(config), 'w') as f:
            json.dump(record, f, indent=0, sort_keys=True)
        print('recorded', config, flush=True)
    raise SystemExit(failed)


if __name__ == '__main__':
    main()
