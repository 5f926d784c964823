# DDQ-DETR with a cheaper step, for training on a time budget (the demo's
# recipe, configs/shapes/ddq-detr-12min_shapes.py): the same model as
# ddq-detr-tiny_shapes.py with
# - 2 decoder layers instead of 3,
# - 20 denoising queries instead of 50 (two groups of ~10 objects),
# - 100 dense (one-to-many) queries instead of 150 (dense_topk_ratio 1.0),
# - fused AdamW (the same update in one kernel; torch >= 2.4 on CPU).
# Its step costs about 0.6x DDQ-DETR's, so it trains 1.6x the iterations in
# the same time. Found by the equal-wall-clock study, not guessed
# (benchmarks/convergence.py --methods ddq-detr-lean --seconds 780, README
# "Quick start"): 0.529 +- 0.012 over 3 seeds against DDQ-DETR's 0.453.
# Either half alone ('ddq-detr+2dec', 'ddq-detr+lean') did about as well
# (0.505-0.540, 1-2 seeds); this one has the cheapest step, which counts
# most on a slow machine.
# The official DDQ-DETR (jshilong/DDQ, mmdet's ddq-detr-4scale_r50) has 6
# decoder layers, 900 queries and 1.5x dense queries: this is a recipe for
# 2 CPU cores and minutes, not the method's COCO setting.
_base_ = ['./ddq-detr-tiny_shapes.py']

model = dict(
    dense_topk_ratio=1.0,
    decoder=dict(num_layers=2),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=20)))
optim_wrapper = dict(optimizer=dict(fused=True))
