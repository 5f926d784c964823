# DDQ-DETR with Co-DETR's auxiliary heads: the tiny DDQ-DETR (distinct
# queries, dense one-to-many branch) plus the auxiliary ATSS and Faster R-CNN
# heads on the encoder output, whose positives become extra decoder query
# groups (Co-DETR's collaborative branches). A combination no official code
# has; both parts keep their own settings (ddq-detr-tiny_shapes.py,
# co-dino-tiny_shapes.py). Heads and extra queries are dropped at inference.
_base_ = ['./ddq-detr-tiny_shapes.py', './co_detr_aux_heads.py']

model = dict(branches=[
    dict(
        type='CollaborativeBranch',
        name='co_rcnn',
        aux_head=_base_.rcnn_head,
        max_queries=300,
        min_queries=9),
    dict(
        type='CollaborativeBranch',
        name='co_atss',
        aux_head=_base_.atss_head,
        max_queries=300,
        min_queries=9),
])
