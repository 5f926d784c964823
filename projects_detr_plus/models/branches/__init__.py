"""Training-only query branches (see :mod:`.base` for the interface)."""
from .base import (MAIN, AttentionBlock, BranchQueries, SegmentedLayers,
                   branch_layers, branch_predictions, concat_branches,
                   fixed_target_loss, layer_loss_dict, learnable_content,
                   matched_set_loss, split_branches, top_proposals)
from .collaborative import CollaborativeBranch
from .denoising import DenoisingBranch
from .dense import DenseQueryBranch
from .group import GroupQueryBranch
from .hybrid import HybridMatchingBranch

__all__ = ['MAIN', 'AttentionBlock', 'BranchQueries', 'concat_branches',
           'SegmentedLayers', 'branch_layers', 'branch_predictions',
           'split_branches', 'layer_loss_dict', 'matched_set_loss',
           'fixed_target_loss', 'top_proposals', 'learnable_content',
           'CollaborativeBranch',
           'DenoisingBranch', 'DenseQueryBranch', 'GroupQueryBranch', 'HybridMatchingBranch']
