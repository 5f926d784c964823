"""Training-time query branches: the contract (:mod:`.protocol`), query
sets (:mod:`.queries`) and one file per method."""
from .align_detr import AlignDETRBranch, IABCELoss
from .collaborative import CollaborativeBranch
from .denoising import DenoisingBranch
from .dense import DenseQueryBranch
from .group import GroupQueryBranch
from .hybrid import HybridMatchingBranch
from .ms_detr import MSDETRBranch
from .protocol import QueryBranch, QueryContext, QueryDetector, SetPredictions
from .queries import (MAIN, QuerySet, SegmentedLayers, concat_query_sets,
                      learnable_content, query_set_layers, set_predictions,
                      split_query_sets, top_proposals)
from .stable_dino import PositionModulatedFocalCost, PositionSupervisedLoss

__all__ = [
    'QueryBranch', 'QueryContext', 'QueryDetector', 'SetPredictions', 'MAIN',
    'QuerySet', 'SegmentedLayers', 'concat_query_sets', 'split_query_sets',
    'query_set_layers', 'set_predictions', 'top_proposals',
    'learnable_content', 'CollaborativeBranch', 'DenoisingBranch',
    'DenseQueryBranch', 'GroupQueryBranch', 'HybridMatchingBranch',
    'AlignDETRBranch', 'IABCELoss', 'PositionSupervisedLoss',
    'PositionModulatedFocalCost', 'MSDETRBranch'
]
