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


def not_called(*args, **kwargs):
    """Stand-in for a function the reference imports but never calls."""
    raise NotImplementedError('stub of a function the test never calls')


def torchvision_stubs(box_ops=None, layer_getter=None):
    """torchvision for DETR-codebase references, by module name:
    ``ops.boxes`` with ``box_area`` (plus ``box_ops``), ``__version__``
    0.13.1 (``util/misc.py`` imports private helpers below 0.7) and, with
    ``layer_getter``, ``models._utils.IntermediateLayerGetter``."""
    boxes = module(
        'torchvision.ops.boxes', box_area=box_area, **(box_ops or {}))
    ops = module('torchvision.ops', __path__=[], boxes=boxes)
    stubs = {'torchvision.ops': ops, 'torchvision.ops.boxes': boxes}
    top = dict(__path__=[], ops=ops, __version__='0.13.1')
    if layer_getter is not None:
        utils = module(
            'torchvision.models._utils', IntermediateLayerGetter=layer_getter)
        top['models'] = module('torchvision.models', __path__=[], _utils=utils)
        stubs.update({
            'torchvision.models': top['models'],
            'torchvision.models._utils': utils
        })
    stubs['torchvision'] = module('torchvision', **top)
    return stubs


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
