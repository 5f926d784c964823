"""Inputs and weights shared by the DDQ upstream reference and its test.

Pure PyTorch and the standard library: ``make_reference.py`` imports this
module next to the authors' mmcv 1.4.7 / mmdet 2.22 and
``test_ddq_upstream_parity.py`` next to mmcv 2 / mmdet 3, so it may import
neither.  Everything here is a function of fixed seeds: the reference files
hold numbers only, and both sides rebuild the same weights and inputs.

* :func:`images`, :func:`ground_truth`, :data:`IMAGES`: a batch of two
  normalised images (padded batch 272x256, the second image's valid part
  256x240) with 4 and 2 ground-truth boxes of the 6 shapes classes;
* :func:`weight_for`: every parameter and buffer as a function of its name
  in *our* model (``our_key``) and its shape, so the two models get the
  same weights through the key mapping alone;
* :func:`projection_for`: a fixed random direction per parameter, to
  compare gradients by a few numbers;
* :func:`checksum`: the numbers that pin a regenerated tensor.
"""
import math
import re
import zlib

import torch

NUM_CLASSES = 6
BATCH_HW = (272, 256)  # (H, W) of the padded batch
# per image: valid (H, W), scale factor (w, h) from the original image
IMAGES = [
    dict(img_shape=(272, 256), scale_factor=(1.6, 1.7)),
    dict(img_shape=(256, 240), scale_factor=(0.8, 1.25)),
]
NUM_GTS = (4, 2)
EMPTY_IMAGES = (1, )  # the second training scenario: image 1 without gt
IMAGE_SEED = 20230322
GT_SEED = 7
WEIGHT_SEED = 1000
PROJECTION_SEED = 5000

# (pattern, replacement) from upstream keys to ours: none, the two tiny
# models name every parameter and buffer alike (the test checks the mapping)
KEY_RENAMES = ()
# box regressions (``conv_reg``, ``aux_conv_reg``): weight gain and bias
REG_GAIN = 0.25
REG_BIAS = 2.0


def images():
    """(2, 3, 272, 256) float32 normalised images (zeros outside each
    image's valid part, as a padded batch)."""
    gen = torch.Generator().manual_seed(IMAGE_SEED)
    batch = torch.randn(len(IMAGES), 3, *BATCH_HW, generator=gen)
    for image, meta in enumerate(IMAGES):
        h, w = meta['img_shape']
        batch[image, :, h:] = 0
        batch[image, :, :, w:] = 0
    return batch


def ground_truth(empty_images=()):
    """Per image ``(boxes (G, 4) absolute xyxy float32, labels (G, )
    int64)`` inside the valid part of the image; none (G = 0) for the
    images in ``empty_images``."""
    gen = torch.Generator().manual_seed(GT_SEED)
    result = []
    for meta, num in zip(IMAGES, NUM_GTS):
        h, w = meta['img_shape']
        # (w, h) from 20 to 260 pixels: positives on P3 and P4
        size = 20 + torch.rand(num, 2, generator=gen) * 240
        size = torch.minimum(size, torch.tensor([w - 2., h - 2.]))
        room = torch.tensor([w, h]) - size
        corner = torch.rand(num, 2, generator=gen) * room
        boxes = torch.cat([corner, corner + size], 1)
        labels = torch.randint(0, NUM_CLASSES, (num, ), generator=gen)
        result.append((boxes.float(), labels))
    for image in empty_images:
        result[image] = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    return result


def _generator(seed, key):
    return torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))


# (pattern on our key, value): biases and weights with their own law
_SPECIAL = (
    # box regressions: boxes of several strides, so that NMS suppresses
    (r'(^|\.)(aux_)?conv_reg\.bias$', lambda noise: REG_BIAS + 0.1 * noise),
    # classification and objectness: a low prior, as trained detectors
    (r'(^|\.)((aux_)?conv_cls|(aux_conv_)?objectness\.2|fc_cls)\.bias$',
     lambda noise: -2 + 0.1 * noise),
)
_NORM = r'(^|\.)(bn\d|gn|norm\w*|\w+_norm|downsample\.1)\.(weight|bias)$'


def weight_for(key, shape):
    """The value of parameter or buffer ``key`` (our name) of ``shape``.

    Norm layers (BN, GN, LN): weight 1 + N(0, 0.1), bias N(0, 0.1),
    running mean N(0, 0.1), running variance U(0.8, 1.2); ``Scale``:
    1 + N(0, 0.05); box-regression biases 2 + N(0, 0.1) and their weights
    N(0, 1 / (16 fan_in)) (boxes of a few strides: the distinct-query NMS
    suppresses about 80% of the candidates); classification and
    objectness biases -2 + N(0, 0.1); other weights N(0, 1 / fan_in),
    other biases N(0, 0.1).
    """
    gen = _generator(WEIGHT_SEED, key)
    shape = tuple(shape)
    if key.endswith('num_batches_tracked'):
        return torch.zeros(shape, dtype=torch.long)
    noise = torch.randn(shape, generator=gen)
    name = key.rsplit('.', 1)[-1]
    if name == 'running_var':
        return 0.8 + 0.4 * torch.rand(shape, generator=gen)
    if name == 'running_mean' or name.endswith('bias') or re.search(
            _NORM, key):
        for pattern, law in _SPECIAL:
            if re.search(pattern, key):
                return law(noise)
        return 0.1 * noise if name != 'weight' else 1 + 0.1 * noise
    if name == 'scale':
        return 1 + 0.05 * noise
    fan_in = math.prod(shape[1:])
    if re.search(r'(^|\.)(aux_)?conv_reg\.weight$', key):
        fan_in *= 1 / REG_GAIN**2
    return noise / math.sqrt(fan_in)


def projection_for(key, shape):
    """A fixed N(0, 1) direction for parameter ``key`` (our name)."""
    return torch.randn(
        tuple(shape), generator=_generator(PROJECTION_SEED, key))


def checksum(tensor):
    """[sum, sum of squares] of a tensor, in float64."""
    t = tensor.detach().double()
    return [float(t.sum()), float((t * t).sum())]


def our_key(upstream_key):
    """Our name of the upstream parameter ``upstream_key``."""
    for old, new in KEY_RENAMES:
        upstream_key = re.sub(old, new, upstream_key)
    return upstream_key
