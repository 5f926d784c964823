"""RoI heads of DETR+ (DDQ R-CNN's Sparse R-CNN stages)."""
from .ddq_sparse_roi_head import DDQSparseRoIHead
from .flexible_roi_extractor import FlexibleRoIExtractor

__all__ = ['DDQSparseRoIHead', 'FlexibleRoIExtractor']
