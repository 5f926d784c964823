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
