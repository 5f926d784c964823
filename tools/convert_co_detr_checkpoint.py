"""Convert an official Co-DETR (Co-DINO) checkpoint into the DETR+ layout.

Official checkpoints of mmdet's ``projects/CO-DETR`` and of Sense-X/Co-DETR
load into DETR+'s Co-DINO directly (the detector renames their keys while
loading); this tool does the renaming offline, reports it, and writes a
checkpoint in our layout::

    python tools/convert_co_detr_checkpoint.py official.pth ours.pth \\
        [--config configs/co_detr/co-dino-5scale_r50_8xb2-12e_coco.py] \\
        [--drop-unmapped] [--verify]

The config says which of our branches has which auxiliary head (they are
matched by kind: see ``projects_detr_plus.models.compat.co_detr_checkpoints``).
``--drop-unmapped`` writes the checkpoint without the official keys that
have no counterpart in the config (otherwise an error naming them);
``--verify`` builds the config's detector and loads the result strictly.
"""
import argparse
import os.path as osp
import sys

import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import _load_checkpoint

import projects_detr_plus  # noqa: F401  (registers modules, trusted loader)
from projects_detr_plus.models.compat.co_detr_checkpoints import (
    SAME_NAMES, branch_kinds_from_config, is_official_layout, official_key_map,
    split_head_pos_embed)

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join(
    REPO_ROOT, 'configs/co_detr/co-dino-5scale_r50_8xb2-12e_coco.py')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='checkpoint to write, DETR+ layout')
    parser.add_argument(
        '--config',
        default=DEFAULT_CONFIG,
        help='DETR+ Co-DINO config the checkpoint is for')
    parser.add_argument(
        '--drop-unmapped',
        action='store_true',
        help='leave out official keys the config has no '
        'counterpart for instead of failing')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='load the result strictly into the config\'s '
        'detector')
    return parser.parse_args(argv)


def official_state_dict(path):
    """The checkpoint and its state dict (``module.`` prefixes removed)."""
    checkpoint = _load_checkpoint(path, map_location='cpu')
    state_dict = checkpoint.get('state_dict', checkpoint)
    state_dict = {
        (k[len('module.'):] if k.startswith('module.') else k): v
        for k, v in state_dict.items()
    }
    return checkpoint, state_dict


def report(mapping, unmapped, dropped):
    """Print what became of every key."""
    same = sum(old == new for old, new in mapping.items())
    print(f'official Co-DETR checkpoint: {len(mapping) + len(unmapped)} '
          'keys')
    print(f'  renamed:   {len(mapping) - same}')
    print(f'  unchanged: {same} ({", ".join(n[:-1] for n in SAME_NAMES)})')
    print(f'  unmapped:  {len(unmapped)}' +
          (' (dropped)' if unmapped and dropped else ''))
    for name in unmapped:
        print(f'    {name}')


def build_detector(config):
    """The config's detector (random weights, no pretrained download)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    model_cfg = config.model
    model_cfg.backbone.init_cfg = None
    return MODELS.build(model_cfg)


def verify(model, state_dict):
    """Strict load into ``model``; the error message, if any."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # size mismatches
        return str(error)
    problems = [
        f'{what} keys: {", ".join(keys)}'
        for what, keys in (('missing', result.missing_keys),
                           ('unexpected', result.unexpected_keys)) if keys
    ]
    return '; '.join(problems)


def main(argv=None):
    args = parse_args(argv)
    config = Config.fromfile(args.config)
    checkpoint, state_dict = official_state_dict(args.src)
    if not is_official_layout(state_dict):
        sys.exit(f'{args.src}: not an official Co-DETR checkpoint (no '
                 'query_head.* keys)')
    kinds = branch_kinds_from_config(config.model.get('branches', []))
    split_head_pos_embed(state_dict)
    model = build_detector(config)
    mapping, unmapped = official_key_map(
        list(state_dict), kinds, set(model.state_dict()))
    report(mapping, unmapped, args.drop_unmapped)
    if unmapped and not args.drop_unmapped:
        sys.exit(f'{len(unmapped)} official keys have no counterpart in '
                 f'{args.config} (auxiliary branches by kind: {kinds}); '
                 'use --drop-unmapped to leave them out')
    converted = {mapping[k]: v for k, v in state_dict.items() if k in mapping}
    if args.verify:
        problems = verify(model, converted)
        if problems:
            sys.exit(f'strict load into {args.config} failed: {problems}')
        print(f'verified: loads strictly into {args.config}')
    meta = dict(
        checkpoint.get('meta') or {},
        converted_from=osp.basename(args.src),
        converter='tools/convert_co_detr_checkpoint.py')
    torch.save(dict(state_dict=converted, meta=meta), args.dst)
    print(f'wrote {args.dst}')


if __name__ == '__main__':
    main()
