# Co-Deformable-DETR on the shapes data: the tiny two-stage Deformable DETR
# with mixed query selection and look forward twice
# (deformable-detr-refine-twostage-tiny_shapes.py) plus Co-DETR's auxiliary
# Faster R-CNN and ATSS heads (co_detr_aux_heads.py), whose candidates become
# customized queries built as the official Co-Deformable-DETR builds them
# (configs/co_detr/co-deformable-detr-refine-twostage_r50_8xb2-12e_coco.py
# gives the sources).
_base_ = [
    './deformable-detr-refine-twostage-tiny_shapes.py',
    './co_detr_aux_heads.py'
]

co_query = dict(
    type='CollaborativeBranch',
    max_queries=300,
    min_queries=9,
    own_query_pos=True,
    coord_feat=True,
    head_embedding='scalar')
model = dict(branches=[
    dict(co_query, name='co_rcnn', aux_head=_base_.rcnn_head),
    dict(co_query, name='co_atss', aux_head=_base_.atss_head),
])
