"""Training-only query branches (see :mod:`.base` for the interface)."""
from .base import (MAIN, BranchQueries, concat_branches, layer_loss_dict,
                   split_branches)
from .denoising import DenoisingBranch

__all__ = ['MAIN', 'BranchQueries', 'concat_branches', 'split_branches',
           'layer_loss_dict', 'DenoisingBranch']
