"""Loading of the compiled extension ``projects_detr_plus.ops._C``.

Importing the extension registers ``torch.ops.detr_plus_C.msda_forward`` and
``msda_backward`` (CPU always, CUDA when it was built with CUDA). Nothing here
raises: a missing or broken extension is reported through :func:`ext_error`
and the op falls back to the pure-PyTorch path (with a one-time warning
issued by :mod:`projects_detr_plus.ops.msda`).
"""
import importlib
from typing import Optional

import torch

EXT_MODULE = 'projects_detr_plus.ops._C'

_state = {'loaded': False, 'module': None, 'error': None}


def load_ext(reload: bool = False):
    """Import the extension once; returns the module or None on failure."""
    if _state['loaded'] and not reload:
        return _state['module']
    _state.update(loaded=True, module=None, error=None)
    try:
        module = importlib.import_module(EXT_MODULE)
        ops = torch.ops.detr_plus_C
        # Touch the operators: a stale .so without them must not count.
        ops.msda_forward.default, ops.msda_backward.default
    except Exception as error:  # noqa: BLE001 - ImportError, OSError, ...
        _state['error'] = f'{type(error).__name__}: {error}'
        return None
    _state['module'] = module
    return module


def ext_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    load_ext()
    return _state['error']


def ext_has_cuda() -> bool:
    """Whether the loaded extension contains the CUDA kernels."""
    module = load_ext()
    return module is not None and bool(module.has_cuda())


def ext_cpu_isa() -> Optional[str]:
    """SIMD variant of the CPU kernel ('avx2' / 'base'), None if not loaded."""
    module = load_ext()
    return None if module is None else module.cpu_isa()
