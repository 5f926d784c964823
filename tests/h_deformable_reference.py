"""Load the authors' H-Deformable-DETR from ``../shared/reference`` and map
its weights onto ours.

The reference (``HDETR/H-Deformable-DETR`` at commit f58ceb11, unmodified,
see its ``SOURCE.md``) is imported as its own top-level packages ``models``
and ``util`` plus its ``engine.py`` (for ``train_hybrid``, the one-to-many
loss), with the reference on ``sys.path`` only while importing.  What this
machine lacks is stubbed at load time:

* ``torchvision``: ``ops.boxes.box_area`` (the formula ``util/box_ops.py``
  uses) and ``models._utils.IntermediateLayerGetter`` (called by
  ``BackboneBase``: here it returns the module it is given, so the
  "backbone" is whatever module :func:`build` passes, see there);
* ``models.swin_transformer`` (Swin backbones, needing timm and mmcv 1.x;
  imported by ``backbone.py``, not used);
* the compiled ``MultiScaleDeformableAttention`` CUDA op (imported by
  ``ms_deform_attn_func.py``): after import, the ``MSDeformAttnFunction``
  that ``models/ops/modules/ms_deform_attn.py`` calls is replaced by mmcv's
  ``multi_scale_deformable_attn_pytorch`` (plain PyTorch ``grid_sample``,
  differentiated by autograd; the same maths as the CUDA kernel, whose
  ``im2col_step`` is a batching detail);
* ``wandb`` and the ``datasets`` package (COCO evaluators, prefetcher), which
  ``engine.py`` imports at module level; ``train_hybrid`` uses none of them.

Afterwards ``sys.path`` and ``sys.modules`` are as before; the loaded
modules stay reachable through :func:`load` only.  The arguments come from
``main.py``'s own parser (:func:`official_args`) and the official recipe's
flags; the model, criterion and post-processor from its ``build``
(:func:`build`).  :func:`our_keys` maps each reference parameter to ours
(``test_h_deformable_parity.py`` checks that it covers both sides once).
"""
import argparse
import ast
import contextlib
import importlib
import io
import os.path as osp
import re
import sys
import warnings
from collections import OrderedDict
from types import SimpleNamespace

import numpy
import torch
from mmcv.ops.multi_scale_deform_attn import \
    multi_scale_deformable_attn_pytorch
from torch import nn

from conftest import REPO_ROOT
from reference_stubs import module, not_called, torchvision_stubs

REFERENCE = osp.join(
    osp.dirname(REPO_ROOT), 'shared', 'reference', 'hdetr-h-deformable-detr')
# the official H-Deformable-DETR recipe this test reproduces (its flags are
# in official_args)
OFFICIAL_CONFIG = ('configs/two_stage/deformable-detr-hybrid-branch/12eps/'
                   'r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_'
                   'deformable_detr_plus_iterative_bbox_refinement_plus_'
                   'plus_two_stage.sh')
# top-level names the reference's import touches
_NAMES = ('models', 'util', 'engine', 'torchvision', 'wandb', 'datasets',
          'MultiScaleDeformableAttention')
_MODULES = ('models.deformable_detr', 'models.deformable_transformer',
            'models.backbone', 'models.position_encoding',
            'models.ops.modules.ms_deform_attn', 'util.misc', 'engine')
_LOADED = {}


def available():
    return all(
        osp.isfile(osp.join(REFERENCE, path))
        for path in ('models/deformable_detr.py',
                     'models/deformable_transformer.py', 'engine.py',
                     OFFICIAL_CONFIG))


def _stubs():
    datasets = {
        f'datasets.{name}': module(f'datasets.{name}', **{attr: not_called})
        for name, attr in (('coco_eval', 'CocoEvaluator'),
                           ('panoptic_eval', 'PanopticEvaluator'),
                           ('data_prefetcher', 'data_prefetcher'))
    }
    return {
        **torchvision_stubs(layer_getter=lambda backbone, **kwargs: backbone),
        'models.swin_transformer':
        module('models.swin_transformer', SwinTransformer=not_called),
        'MultiScaleDeformableAttention':
        module('MultiScaleDeformableAttention'),
        'wandb':
        module('wandb'),
        'datasets':
        module('datasets', __path__=[]),
        **datasets,
    }


def _touched(name):
    return any(name == top or name.startswith(top + '.') for top in _NAMES)


class _PyTorchMSDeformAttn:
    """Stands for the reference's ``MSDeformAttnFunction`` (CUDA only)."""

    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights, im2col_step):
        return multi_scale_deformable_attn_pytorch(value, spatial_shapes,
                                                   sampling_locations,
                                                   attention_weights)


def load():
    """The reference's modules, as attributes named after their files
    (``deformable_detr``, ``deformable_transformer``, ``backbone``,
    ``position_encoding``, ``ms_deform_attn``, ``misc``, ``engine``)."""
    if not _LOADED:
        saved = {k: v for k, v in sys.modules.items() if _touched(k)}
        for name in saved:
            del sys.modules[name]
        sys.modules.update(_stubs())
        sys.path.insert(0, REFERENCE)
        bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            with warnings.catch_warnings():
                # torch.cuda.amp.custom_fwd / GradScaler are deprecated;
                # ms_deform_attn.py's docstring has an invalid escape
                warnings.simplefilter('ignore')
                for name in _MODULES:
                    _LOADED[name.split('.')[-1]] = \
                        importlib.import_module(name)
        finally:
            sys.dont_write_bytecode = bytecode
            sys.path.remove(REFERENCE)
            sys.path_importer_cache.pop(REFERENCE, None)
            for name in [k for k in sys.modules if _touched(k)]:
                del sys.modules[name]
            sys.modules.update(saved)
        _LOADED['ms_deform_attn'].MSDeformAttnFunction = _PyTorchMSDeformAttn
    return SimpleNamespace(**_LOADED)


def official_flags():
    """The command-line flags of :data:`OFFICIAL_CONFIG` (its ``python -u
    main.py ...`` line, without ``--output_dir``)."""
    with open(osp.join(REFERENCE, OFFICIAL_CONFIG)) as f:
        words = f.read().split('main.py', 1)[1].split()
    words = [w for w in words[:words.index('${PY_ARGS}')] if w != '\\']
    at = words.index('--output_dir')
    return words[:at] + words[at + 2:]


def official_args(**sizes):
    """``main.py``'s arguments for :data:`OFFICIAL_CONFIG`, on the CPU.

    ``main.py``'s own ``get_args_parser`` (taken from its source: the
    module imports the datasets) parses the recipe's flags (two-stage, box
    refinement, mixed selection, look forward twice, dropout 0, k_one2many
    6, lambda_one2many 1, ...), then ``sizes`` (``enc_layers=2``, ...) and
    ``--device cpu``.
    """
    with open(osp.join(REFERENCE, 'main.py')) as f:
        tree = ast.parse(f.read())
    function = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef)
        and node.name == 'get_args_parser')
    namespace = dict(argparse=argparse, np=numpy)
    exec(compile(ast.Module([function], []), 'main.py', 'exec'), namespace)
    extra = [f'--{key}={value}' for key, value in sizes.items()]
    return namespace['get_args_parser']().parse_args(official_flags() + extra +
                                                     ['--device', 'cpu'])


class FixedFeatures(nn.Module):
    """A backbone body that returns :attr:`features` (C3, C4, C5 maps, set
    before each forward) whatever the image: both models see the same
    backbone outputs."""

    def __init__(self):
        super().__init__()
        self.features = None

    def forward(self, images):
        return OrderedDict((str(i), f) for i, f in enumerate(self.features))


def build(args, num_channels, strides=(8, 16, 32)):
    """The reference's ``build(args)`` (model, criterion, postprocessors)
    on a backbone that returns fixed features.

    The backbone is the reference's own ``Joiner`` of a ``BackboneBase``
    (its mask interpolation) and the position encoding ``build_backbone``
    would give, around a :class:`FixedFeatures` body (``model.backbone[0].
    body``) with the given ``num_channels`` and ``strides``; the rest
    (input projections and extra level, transformer, heads, matcher,
    criterion and its weights) is built by ``build`` unchanged (what it
    prints is dropped).
    """
    ref = load()
    body = ref.backbone.BackboneBase(FixedFeatures(), True, True)
    body.strides, body.num_channels = list(strides), list(num_channels)
    joiner = ref.backbone.Joiner(
        body, ref.position_encoding.build_position_encoding(args))
    original = ref.deformable_detr.build_backbone
    ref.deformable_detr.build_backbone = lambda _: joiner
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return ref.deformable_detr.build(args)
    finally:
        ref.deformable_detr.build_backbone = original


# ---------------------------------------------------------------------------
# weights: reference key -> our key
# ---------------------------------------------------------------------------
_ENCODER_LAYER = {
    'norm1': 'norms.0',
    'norm2': 'norms.1',
    'linear1': 'ffn.layers.0.0',
    'linear2': 'ffn.layers.1'
}
# the reference's decoder layer: self-attention -> norm2, cross-attention ->
# norm1, FFN -> norm3; ours (mmdet's): norms 0, 1, 2 in that order
_DECODER_LAYER = {
    'norm2': 'norms.0',
    'norm1': 'norms.1',
    'norm3': 'norms.2',
    'linear1': 'ffn.layers.0.0',
    'linear2': 'ffn.layers.1',
    'self_attn': 'self_attn.attn'
}
_TWO_STAGE = {
    'enc_output': 'memory_trans_fc',
    'enc_output_norm': 'memory_trans_norm',
    'pos_trans': 'pos_trans_fc',
    'pos_trans_norm': 'pos_trans_norm'
}
# conv biases of the input projections: the reference's Conv2d has one,
# ours (ChannelMapper's ConvModule before GroupNorm, bias='auto') none; the
# reference initialises them to 0 and they are kept at 0
REFERENCE_ONLY = re.compile(r'input_proj\.\d+\.0\.bias')


def our_keys(ref_key, num_queries_one2one):
    """Where reference parameter ``ref_key`` lives in our detector.

    Returns:
        list[tuple[str, slice | None]]: (our key, rows of the reference
        tensor or None for all of it); empty for :data:`REFERENCE_ONLY`
        keys.  The reference's one ``query_embed`` table (one-to-one rows
        first, then one-to-many) is our ``query_embedding`` plus the hybrid
        branch's ``content``.

    Raises:
        KeyError: a key this mapping does not know.
    """
    if REFERENCE_ONLY.fullmatch(ref_key):
        return []
    if ref_key == 'query_embed.weight':
        n = num_queries_one2one
        return [('query_embedding.weight', slice(0, n)),
                ('extra_branches.0.content.weight', slice(n, None))]
    return [(_our_key(ref_key), None)]


def _our_key(key):
    rules = [
        (r'transformer\.level_embed', lambda m: 'level_embed'),
        (r'transformer\.(enc_output|enc_output_norm|pos_trans|'
         r'pos_trans_norm)\.(weight|bias)',
         lambda m: f'{_TWO_STAGE[m[1]]}.{m[2]}'),
        # MSDeformAttn: same names (encoder self_attn, decoder cross_attn)
        (r'transformer\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|'
         r'cross_attn)\.(sampling_offsets|attention_weights|value_proj|'
         r'output_proj)\.(weight|bias)',
         lambda m: f'{m[1]}.layers.{m[2]}.{m[3]}.{m[4]}.{m[5]}'),
        (r'transformer\.encoder\.layers\.(\d+)\.(\w+)\.(weight|bias)',
         lambda m: f'encoder.layers.{m[1]}.{_ENCODER_LAYER[m[2]]}.{m[3]}'),
        (r'transformer\.decoder\.layers\.(\d+)\.self_attn\.(in_proj_weight|'
         r'in_proj_bias|out_proj\.weight|out_proj\.bias)',
         lambda m: f'decoder.layers.{m[1]}.self_attn.attn.{m[2]}'),
        (r'transformer\.decoder\.layers\.(\d+)\.(\w+)\.(weight|bias)',
         lambda m: f'decoder.layers.{m[1]}.{_DECODER_LAYER[m[2]]}.{m[3]}'),
        (r'(?:transformer\.decoder\.)?class_embed\.(\d+)\.(weight|bias)',
         lambda m: f'bbox_head.cls_branches.{m[1]}.{m[2]}'),
        (r'(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.layers\.(\d)\.'
         r'(weight|bias)',
         lambda m: f'bbox_head.reg_branches.{m[1]}.{2 * int(m[2])}.{m[3]}'),
        (r'input_proj\.(\d+)\.0\.weight',
         lambda m: f'{_neck_conv(m[1])}.conv.weight'),
        (r'input_proj\.(\d+)\.1\.(weight|bias)',
         lambda m: f'{_neck_conv(m[1])}.gn.{m[2]}'),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    raise KeyError(f'no rule maps reference key {key!r}')


def _neck_conv(index):
    """The reference's input projections 0-2 are ChannelMapper's ``convs``,
    its 4th (the stride-2 3x3 on C5) is ``extra_convs.0``."""
    index = int(index)
    return f'neck.convs.{index}' if index < 3 else 'neck.extra_convs.0'


def reference_parameters(reference):
    """The reference model's distinct parameters by name (the box and
    class heads are shared with ``transformer.decoder`` under two names:
    one entry each, named as ``named_parameters`` names them first)."""
    return dict(reference.named_parameters())


def shared_parameters(reference, ours, num_queries_one2one):
    """[(reference name, rows, reference parameter, our name, our
    parameter)] for every reference parameter that has a counterpart."""
    mine = dict(ours.named_parameters())
    pairs = []
    for name, param in reference_parameters(reference).items():
        for key, rows in our_keys(name, num_queries_one2one):
            pairs.append((name, rows, param, key, mine[key]))
    return pairs


@torch.no_grad()
def copy_weights(ours, reference, num_queries_one2one):
    """Our weights into the reference (its :data:`REFERENCE_ONLY` biases
    set to 0)."""
    for _, rows, theirs, _, param in shared_parameters(reference, ours,
                                                       num_queries_one2one):
        (theirs if rows is None else theirs[rows]).copy_(param)
    for name, param in reference_parameters(reference).items():
        if REFERENCE_ONLY.fullmatch(name):
            param.zero_()
