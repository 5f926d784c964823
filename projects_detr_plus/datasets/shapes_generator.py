"""Deterministic generator of the embedded *shapes* detection dataset.

Each image has a textured, noisy background and 1-20 filled shapes of
``CLASSES`` drawn in random colours (at least ``min_contrast`` from the mean
colour behind them, so that every object is visible), sizes (about 8 px up
to most of the image), positions and rotations.  Later shapes partially
occlude earlier ones; a shape is only placed if every earlier shape keeps
at least ``min_visible`` of its pixels, and its box is the tight box of its
*visible* pixels (COCO convention).

The output is a COCO detection dataset::

    root/
      annotations/instances_{split}.json
      {split}/{image_id:06d}.png

Same arguments -> same bytes: all randomness comes from one
``numpy.random.Generator`` seeded by ``seed``.

A second look for fine-tuning studies (``classes`` and ``background`` of
:class:`ShapesSpec`): other classes, two of them (:data:`NEW_SHAPES`) never
seen in the shapes data, on striped backgrounds.  Those two fields are
stored with a split only when they are set, so the shapes splits keep their
bytes.
"""
import json
import os
import os.path as osp
import tempfile
from dataclasses import asdict, dataclass

import cv2
import numpy as np

CLASSES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')
#: shapes the generator also draws, in none of the shapes splits
NEW_SHAPES = ('ring', 'arrow')
BACKGROUNDS = ('textured', 'stripes')
#: fields added after the shapes splits were fixed: stored only when set
LATER_FIELDS = dict(classes=CLASSES, background='textured')


@dataclass(frozen=True)
class ShapesSpec:
    """What one split contains; the whole spec is stored next to the data."""
    split: str = 'train'
    num_images: int = 2000
    image_size: int = 128
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 20
    mean_objects: float = 7.0
    min_object_size: int = 8
    max_object_frac: float = 0.85
    min_visible: float = 0.5
    min_contrast: float = 80.0
    classes: tuple = CLASSES
    background: str = 'textured'

    def __post_init__(self):
        object.__setattr__(self, 'classes', tuple(self.classes))
        unknown = set(self.classes) - set(CLASSES + NEW_SHAPES)
        if unknown or not self.classes:
            raise ValueError(f'classes must be some of '
                             f'{CLASSES + NEW_SHAPES}, got {self.classes}')
        if self.background not in BACKGROUNDS:
            raise ValueError(f'background must be one of {BACKGROUNDS}, got '
                             f'{self.background!r}')

    def stored(self):
        """The fields written with a split (:data:`LATER_FIELDS` only where
        they differ from their defaults)."""
        fields = asdict(self)
        for name, default in LATER_FIELDS.items():
            if fields[name] == default:
                del fields[name]
            else:
                fields[name] = list(fields[name]) if name == 'classes' \
                    else fields[name]
        return fields


def _polygon(name):
    """Unit-radius outline of ``name`` centred at 0 as (K, 2) float array."""
    if name == 'square':
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if name == 'triangle':
        angles = np.array([-0.5, 1 / 6, 5 / 6]) * np.pi
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if name == 'hexagon':
        angles = np.arange(6) * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], 1)
    if name == 'star':
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
    if name == 'arrow':  # pointing up: head, then the shaft
        return np.array([[0, -1], [0.75, -0.15], [0.28, -0.15], [0.28, 1],
                         [-0.28, 1], [-0.28, -0.15], [-0.75, -0.15]])
    if name == 'cross':
        a = 0.33
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a],
                         [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a,
                                                                       -a]])
    raise ValueError(f'no polygon for shape {name!r}')


def _shape_mask(name, size, rotation, aspect, canvas, centre):
    """Binary mask (H, W) of one shape of bounding diameter ``size``."""
    mask = np.zeros(canvas, np.uint8)
    radius = size / 2.0
    if name == 'ring':  # a circle without its inner 55 %
        outer = _shape_mask('circle', size, rotation, aspect, canvas, centre)
        return outer & ~_shape_mask('circle', size * 0.55, rotation, aspect,
                                    canvas, centre)
    if name == 'circle':
        axes = (max(1, int(round(radius))), max(1,
                                                int(round(radius * aspect))))
        cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))), axes,
                    np.degrees(rotation), 0, 360, 1, -1)
        return mask.astype(bool)
    points = _polygon(name) * radius
    points[:, 1] *= aspect
    cos, sin = np.cos(rotation), np.sin(rotation)
    points = points @ np.array([[cos, sin], [-sin, cos]]) + centre
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask.astype(bool)


def _background(rng, size):
    """Textured, noisy RGB background (H, W, 3) float32 in [0, 255]."""
    low = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(2, 7)):  # clutter: thin random strokes
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        p2 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.line(image, p1, p2, colour, 1)
    return image + rng.normal(0, rng.uniform(4, 18), image.shape)


def _striped_background(rng, size):
    """Two-colour stripes at a random angle and period, a smooth shading
    and noise (H, W, 3) float32: the fine-tuning data's look."""
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(5, 20)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    image = colours[(np.floor(phase) % 2).astype(int)]
    shade = np.linspace(rng.uniform(-40, 0), rng.uniform(0, 40), size)
    image = image + shade[:, None, None].astype(np.float32)
    return image + rng.normal(0, rng.uniform(4, 12), image.shape)


def _texture(rng, size, colour):
    """A noisy fill (H, W, 3) around ``colour`` so shapes are not flat."""
    noise = rng.normal(0, rng.uniform(2, 14), (size, size, 1))
    return colour[None, None, :] + noise


def _contrasting_colour(rng, behind, min_contrast):
    """A random colour at least ``min_contrast`` (RGB distance) from the
    mean colour ``behind`` the object, so every object can be seen."""
    for _ in range(20):
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        if np.linalg.norm(colour - behind) >= min_contrast:
            return colour
    return np.where(behind > 127, 0.0, 255.0).astype(np.float32)


def _place_objects(rng, spec):
    """Sample shapes; return [(class_index, mask)] with partial occlusion."""
    size, objects = spec.image_size, []
    visible_owner = np.full((size, size), -1, np.int32)
    # about as many objects as a COCO image (7.3 on average), 1 to 20
    count = int(
        np.clip(
            spec.min_objects +
            rng.poisson(spec.mean_objects - spec.min_objects),
            spec.min_objects, spec.max_objects))
    max_size = spec.max_object_frac * size / np.sqrt(max(1, count / 3))
    max_size = max(max_size, spec.min_object_size * 1.5)
    for _ in range(count):
        for _attempt in range(10):
            label = int(rng.integers(len(spec.classes)))
            diameter = float(
                np.exp(
                    rng.uniform(
                        np.log(spec.min_object_size), np.log(max_size))))
            centre = rng.uniform(0, size, 2)
            mask = _shape_mask(spec.classes[label], diameter,
                               rng.uniform(0, 2 * np.pi),
                               rng.uniform(0.7, 1.0), (size, size), centre)
            if mask.sum() < 0.3 * spec.min_object_size**2:
                continue
            if _keeps_earlier_visible(objects, visible_owner, mask, spec):
                visible_owner[mask] = len(objects)
                objects.append((label, mask))
                break
    return [(label, visible_owner == index)
            for index, (label, _) in enumerate(objects)]


def _keeps_earlier_visible(objects, visible_owner, mask, spec):
    """Whether every earlier object keeps ``min_visible`` of its pixels."""
    if not objects:
        return True
    visible = np.bincount(
        visible_owner[visible_owner >= 0], minlength=len(objects))
    covered = visible_owner[mask]
    lost = np.bincount(covered[covered >= 0], minlength=len(objects))
    full = np.array([full_mask.sum() for _, full_mask in objects])
    remaining = visible - lost
    return bool(
        np.all((remaining >= spec.min_visible * full)
               & (remaining >= 12)))


def render_image(rng, spec):
    """Render one image; return (uint8 image (H, W, 3) BGR, annotations)."""
    image = (_striped_background if spec.background == 'stripes' else
             _background)(rng, spec.image_size)
    objects = _place_objects(rng, spec)
    annotations = []
    for label, visible in objects:
        colour = _contrasting_colour(rng, image[visible].mean(0),
                                     spec.min_contrast)
        texture = _texture(rng, spec.image_size, colour)
        image[visible] = texture[visible]
        ys, xs = np.nonzero(visible)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        annotations.append(
            dict(
                category_id=label + 1,
                bbox=[int(x1), int(y1),
                      int(x2 - x1),
                      int(y2 - y1)],
                area=int(visible.sum()),
                iscrowd=0))
    gain, bias = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)  # jitter
    image = np.clip(image * gain + bias, 0, 255).astype(np.uint8)
    return image, annotations


def generate_split(root, spec):
    """Write one split of the dataset under ``root``; return the ann path."""
    rng = np.random.default_rng([spec.seed, len(spec.split)])
    image_dir = osp.join(root, spec.split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    coco = dict(
        images=[],
        annotations=[],
        categories=[
            dict(id=i + 1, name=name) for i, name in enumerate(spec.classes)
        ],
        info=dict(description='DETR+ synthetic shapes', spec=spec.stored()))
    for image_id in range(1, spec.num_images + 1):
        image, annotations = render_image(rng, spec)
        file_name = f'{image_id:06d}.png'
        _atomic_write(
            osp.join(image_dir, file_name),
            cv2.imencode('.png', image)[1].tobytes())
        coco['images'].append(
            dict(
                id=image_id,
                file_name=file_name,
                width=spec.image_size,
                height=spec.image_size))
        for ann in annotations:
            ann.update(id=len(coco['annotations']) + 1, image_id=image_id)
            coco['annotations'].append(ann)
    ann_file = annotation_path(root, spec.split)
    _atomic_write(ann_file, json.dumps(coco, sort_keys=True).encode())
    return ann_file


def annotation_path(root, split):
    return osp.join(root, 'annotations', f'instances_{split}.json')


def stored_spec(root, split):
    """The spec a split on disk was generated with, or None."""
    try:
        with open(annotation_path(root, split)) as f:
            return ShapesSpec(**json.load(f)['info']['spec'])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _atomic_write(path, data):
    """Write bytes so that concurrent writers (DDP ranks) never leave a torn
    file."""
    fd, tmp = tempfile.mkstemp(dir=osp.dirname(path), suffix='.tmp')
    with os.fdopen(fd, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)
