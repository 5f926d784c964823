"""The encoder output as a feature pyramid (for heads trained on it).

Co-DETR's auxiliary heads (ATSS, FCOS, Faster R-CNN) train on the encoder
memory cut back into per-level maps, plus one stride-2 level on top that all
the heads of a detector share (official ``CoDINOHead.downsample``).
"""
from torch import nn


def extra_pyramid_level(embed_dims):
    """The stride-2 conv + GroupNorm that adds one level on top of the
    encoder's (official ``CoDINOHead.downsample``)."""
    if embed_dims % 32:
        raise ValueError('the auxiliary heads\' extra pyramid level has a '
                         'GroupNorm of 32 groups: embed_dims must be a '
                         f'multiple of 32, got {embed_dims}')
    return nn.Sequential(
        nn.Conv2d(embed_dims, embed_dims, 3, stride=2, padding=1),
        nn.GroupNorm(32, embed_dims))


def encoder_pyramid(memory, spatial_shapes, extra_level):
    """Encoder memory (bs, sum(h*w), dim) as per-level (bs, dim, h, w)
    maps, plus ``extra_level`` applied to the last one.

    The maps are contiguous: mmcv's ``RoIAlign`` reads its input as
    contiguous NCHW memory whatever its strides (the official Co-DETR makes
    each level ``.contiguous()`` too), so a transposed view would give the
    R-CNN heads scrambled features."""
    sizes = [int(h) * int(w) for h, w in spatial_shapes]
    levels = [
        level.transpose(1, 2).reshape(memory.shape[0], -1, int(h),
                                      int(w)).contiguous()
        for level, (h, w) in zip(memory.split(sizes, dim=1), spatial_shapes)
    ]
    return tuple(levels + [extra_level(levels[-1])])
