"""Detectors, heads, layers and assigners of DETR+ (registered into mmdet)."""
