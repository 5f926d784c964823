"""Runtime fixes that importing the plugin applies to mmengine."""
from .checkpoint import install_local_checkpoint_loader, load_from_local_trusted

install_local_checkpoint_loader()

__all__ = ['install_local_checkpoint_loader', 'load_from_local_trusted']
