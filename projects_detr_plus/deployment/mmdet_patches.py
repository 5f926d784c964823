"""Export-time twins of the mmdet code ``torch.export`` cannot trace.

Each is set on a detector (or one of its modules) for one forward pass by
:func:`patched` and removed afterwards:

* :func:`pre_transformer`: mmdet's ``pre_transformer`` reads the image sizes
  through ``torch._shape_as_tensor`` and per-image Python loops; this is its
  no-padding path;
* :func:`level_shapes`: mmdet's encoder reference points and two-stage
  proposals loop over the *values* of the ``spatial_shapes`` tensor; the
  twins take the feature sizes as (symbolic) Python ints;
* :func:`swin_windows`: mmdet's Swin backbone computes the batch size of
  its windows as ``int(a / b)`` of sizes, which fixes the batch and image
  size; the twin infers it.

One twin is there for speed, not to be traceable:

* :func:`flat_sampling_locations`: MSDeformAttn's sampling locations
  (reference points + offsets / normaliser) as broadcasts that ONNX Runtime
  runs fast (bitwise the same values as the eager form).
"""
from contextlib import ExitStack, contextmanager

import torch

__all__ = [
    'pre_transformer', 'patched', 'pixel_grid', 'level_shapes', 'swin_windows',
    'window_reverse', 'flat_sampling_locations'
]


def pre_transformer(det, feats):
    """mmdet's ``pre_transformer`` for a batch without padding.

    Args:
        feats (tuple[Tensor]): (B, dim, h_l, w_l) per level.

    Returns:
        tuple[dict, dict]: encoder inputs (``feat`` (B, keys, dim),
        ``feat_mask`` None, ``feat_pos`` (B, keys, dim), ``spatial_shapes``
        (levels, 2), ``level_start_index`` (levels,), ``valid_ratios``
        (B, levels, 2) of ones) and decoder inputs.
    """
    flat, positions = [], []
    for level, feat in enumerate(feats):
        pos = det.positional_encoding(None, input=feat)
        flat.append(feat.flatten(2).transpose(1, 2))
        positions.append(
            pos.flatten(2).transpose(1, 2) +
            det.level_embed[level].view(1, 1, -1))
    spatial_shapes = torch.tensor([[feat.shape[2], feat.shape[3]]
                                   for feat in feats],
                                  dtype=torch.long,
                                  device=feats[0].device)
    level_start_index = torch.cat((spatial_shapes.new_zeros(
        (1, )), spatial_shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = feats[0].new_ones(feats[0].shape[0], len(feats), 2)
    shared = dict(
        spatial_shapes=spatial_shapes,
        level_start_index=level_start_index,
        valid_ratios=valid_ratios)
    encoder_inputs = dict(
        feat=torch.cat(flat, 1),
        feat_mask=None,
        feat_pos=torch.cat(positions, 1),
        **shared)
    return encoder_inputs, dict(memory_mask=None, **shared)


@contextmanager
def patched(obj, **methods):
    """Set instance attributes ``methods`` on ``obj``, then remove them."""
    for name in methods:
        if name in vars(obj):
            raise RuntimeError(f'{type(obj).__name__}.{name} is already '
                               'overridden on the instance')
    try:
        for name, method in methods.items():
            setattr(obj, name, method)
        yield
    finally:
        for name in methods:
            vars(obj).pop(name, None)


def pixel_grid(h, w, device):
    """(h, w) pixel-centre coordinates x + 0.5, y + 0.5 as two (h, w)
    tensors: mmdet's ``linspace(0.5, n - 0.5, n)`` (bitwise: the steps are
    exactly 1), but from ``arange``, which keeps ``n`` symbolic."""
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing='ij')
    return grid_x, grid_y


@contextmanager
def level_shapes(det, shapes):
    """Swap mmdet's two loops over the *values* of ``spatial_shapes`` for
    twins that take the level sizes as (symbolic) ints.

    ``torch.export`` cannot turn tensor values back into sizes, and
    ``torch.linspace`` specialises symbolic sizes, so the twins use
    :func:`pixel_grid`.  They are the no-padding paths (``memory_mask``
    None) of
    ``DeformableDetrTransformerEncoder.get_encoder_reference_points`` and
    ``DeformableDETR.gen_encoder_output_proposals``.

    Args:
        shapes (list[tuple]): (h_l, w_l) per level.
    """

    def encoder_reference_points(spatial_shapes, valid_ratios, device):
        """(bs, keys, levels, 2) reference points of the encoder."""
        points = []
        for level, (h, w) in enumerate(shapes):
            ref_x, ref_y = pixel_grid(h, w, device)
            ref_y = ref_y.reshape(-1)[None] / (
                valid_ratios[:, None, level, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (
                valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def encoder_output_proposals(memory, memory_mask, spatial_shapes):
        """Transformed memory (bs, keys, dim) and proposals (bs, keys, 4)
        before the sigmoid, (cx, cy, w, h)."""
        assert memory_mask is None
        bs = memory.size(0)
        proposals = []
        for level, (h, w) in enumerate(shapes):
            grid_x, grid_y = pixel_grid(h, w, memory.device)
            scale = torch.tensor([w, h],
                                 dtype=torch.float32,
                                 device=memory.device)
            grid = torch.stack([grid_x, grid_y], -1)[None] / scale
            grid = grid.expand(bs, -1, -1, -1)
            wh = torch.ones_like(grid) * 0.05 * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(bs, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).sum(
            -1, keepdim=True) == proposals.shape[-1]
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(~valid, float('inf'))
        output = memory.masked_fill(~valid, float(0))
        output = det.memory_trans_norm(det.memory_trans_fc(output))
        return output, proposals

    with patched(det.encoder,
                 get_encoder_reference_points=encoder_reference_points), \
            patched(det,
                    gen_encoder_output_proposals=encoder_output_proposals):
        yield


@contextmanager
def swin_windows(backbone):
    """mmdet's ``ShiftWindowMSA.window_reverse`` with the batch size
    inferred (-1) instead of ``int(windows / (H * W / ws / ws))``, which
    ``torch.export`` can only evaluate for the traced sizes; same result."""
    with ExitStack() as stack:
        for module in backbone.modules():
            if type(module).__name__ == 'ShiftWindowMSA' and hasattr(
                    module, 'window_reverse'):
                stack.enter_context(
                    patched(module, window_reverse=window_reverse(module)))
        yield


def window_reverse(module):
    """The twin of ``module.window_reverse`` (a ``ShiftWindowMSA``)."""

    def reverse(windows, h, w):
        """(B * windows, ws, ws, C) -> (B, h, w, C)."""
        size = module.window_size
        x = windows.view(-1, h // size, w // size, size, size,
                         windows.shape[-1])
        return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, windows.shape[-1])

    return reverse


@contextmanager
def flat_sampling_locations(model):
    """Every ``MultiScaleDeformableAttentionPlus`` of ``model`` computes its
    sampling locations with ``_sampling_locations_flat`` instead of
    ``_sampling_locations``: the same values, from broadcasts that take
    ONNX Runtime 9 to 13 times less kernel time (the eager form's
    broadcasts repeat every 2 elements, the (x, y) pair; tiny DINO at batch
    8, DINO R50 at batch 1).  Modules of a subclass with its own
    ``_sampling_locations`` keep it."""
    from ..models.layers.msda_attention import \
        MultiScaleDeformableAttentionPlus as Attention
    eager = Attention._sampling_locations
    with ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, Attention) and \
                    type(module)._sampling_locations is eager:
                stack.enter_context(
                    patched(
                        module,
                        _sampling_locations=module._sampling_locations_flat))
        yield
