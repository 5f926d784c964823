"""RoIAlign with a flexible receptive field (the DDQ paper, Sec. "RoIAlign
with Flexible Receptive Field"; not in the released code).

Each RoI is pooled from the pyramid level mmdet maps it to *and* the
adjacent levels (one finer, one coarser, where they exist), and the pooled
features are averaged: the query sees a wider context at little cost.
"""
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from mmdet.registry import MODELS


@MODELS.register_module()
class FlexibleRoIExtractor(SingleRoIExtractor):
    """``SingleRoIExtractor`` averaging levels ``l - 1``, ``l``, ``l + 1``
    (clipped to the pyramid) for a RoI mapped to level ``l``.

    Args:
        neighbours (int): how many levels on each side (1 in the paper).
        *args, **kwargs: as ``SingleRoIExtractor``.
    """

    def __init__(self, *args, neighbours=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.neighbours = neighbours

    def forward(self, feats, rois, roi_scale_factor=None):
        """feats: per level (B, C, H_l, W_l); rois (n, 5) as (image, x1, y1,
        x2, y2).  Returns (n, C, out_h, out_w)."""
        rois = rois.type_as(feats[0])
        num_levels = len(feats)
        roi_feats = feats[0].new_zeros(
            rois.size(0), self.out_channels, *self.roi_layers[0].output_size)
        target = self.map_roi_levels(rois, num_levels)
        if roi_scale_factor is not None:
            rois = self.roi_rescale(rois, roi_scale_factor)
        count = roi_feats.new_zeros(rois.size(0))
        for offset in range(-self.neighbours, self.neighbours + 1):
            levels = target + offset
            for level in range(num_levels):
                inds = (levels == level).nonzero(as_tuple=True)[0]
                # every level in the graph: no DDP hang on unused levels
                roi_feats = roi_feats + feats[level].sum() * 0.
                if inds.numel():
                    roi_feats = roi_feats.index_add(
                        0, inds, self.roi_layers[level](feats[level],
                                                        rois[inds]))
                    count = count.index_add(0, inds,
                                            count.new_ones(inds.numel()))
        return roi_feats / count.clamp(min=1)[:, None, None, None]
