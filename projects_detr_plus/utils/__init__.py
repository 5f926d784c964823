"""Runtime fixes that importing the plugin applies to mmengine."""
from .amp import CPUBF16AutocastOptimWrapper
from .checkpoint import (install_local_checkpoint_loader,
                         load_from_local_trusted)
from .checkpoint_files import (IncompleteCheckpointError,
                               install_crash_safe_checkpoints)
from .distributed import install_cpu_distributed_fallback, leave_process_group
from .flops import install_flop_handle
from .non_finite import NonFiniteGuardHook, NonFiniteTrainingError
from .random_state import RandomStateHook, get_rng_state, set_rng_state
from .time_budget import TrainTimeBudgetHook

install_local_checkpoint_loader()
install_crash_safe_checkpoints()
install_cpu_distributed_fallback()
install_flop_handle()

__all__ = [
    'CPUBF16AutocastOptimWrapper', 'install_local_checkpoint_loader',
    'IncompleteCheckpointError', 'install_crash_safe_checkpoints',
    'install_cpu_distributed_fallback', 'install_flop_handle',
    'leave_process_group', 'load_from_local_trusted', 'NonFiniteGuardHook',
    'NonFiniteTrainingError', 'RandomStateHook', 'get_rng_state',
    'set_rng_state', 'TrainTimeBudgetHook'
]
