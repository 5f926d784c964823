"""Runtime fixes that importing the plugin applies to mmengine."""
from .amp import CPUBF16AutocastOptimWrapper
from .checkpoint import install_local_checkpoint_loader, load_from_local_trusted

install_local_checkpoint_loader()

__all__ = ['CPUBF16AutocastOptimWrapper', 'install_local_checkpoint_loader', 'load_from_local_trusted']
