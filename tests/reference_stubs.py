"""Stand-ins for packages the authors' code imports but this machine lacks
(torchvision, detectron2, detrex), for the loaders of ``../shared/
reference`` (``*_reference.py``): put into ``sys.modules`` only while the
reference is imported."""
import types


def module(name, **attrs):
    """A module object ``name`` holding ``attrs``."""
    stub = types.ModuleType(name)
    stub.__dict__.update(attrs)
    return stub


def box_area(boxes):
    """torchvision's ``box_area`` of (n, 4) xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def detrex_stubs(**utils):
    """torchvision (``ops.boxes.box_area``), an empty ``detrex`` package
    and ``detrex.utils`` for one process (plus ``utils``), by module
    name: what detrex-based reference code imports."""
    boxes = module('torchvision.ops.boxes', box_area=box_area)
    return {
        'torchvision':
        module('torchvision', __path__=[]),
        'torchvision.ops':
        module('torchvision.ops', __path__=[], boxes=boxes),
        'torchvision.ops.boxes':
        boxes,
        'detrex':
        module('detrex', __path__=[]),
        'detrex.utils':
        module(
            'detrex.utils',
            get_world_size=lambda: 1,
            is_dist_avail_and_initialized=lambda: False,
            **utils),
    }
