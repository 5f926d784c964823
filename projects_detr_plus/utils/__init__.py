"""Runtime fixes that importing the plugin applies to mmengine."""
from .amp import CPUBF16AutocastOptimWrapper
from .checkpoint import install_local_checkpoint_loader, load_from_local_trusted
from .random_state import RandomStateHook, get_rng_state, set_rng_state

install_local_checkpoint_loader()

__all__ = [
    'CPUBF16AutocastOptimWrapper', 'install_local_checkpoint_loader',
    'load_from_local_trusted', 'RandomStateHook', 'get_rng_state',
    'set_rng_state'
]
