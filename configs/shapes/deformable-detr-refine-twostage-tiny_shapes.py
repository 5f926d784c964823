# Deformable DETR + box refinement + two-stage on the shapes data, with
# H-Deformable-DETR's mixed query selection and look forward twice: the base
# that H-Deformable-DETR (h-deformable-detr-tiny_shapes.py) adds its hybrid
# branch to.
_base_ = ['./deformable-detr-tiny_shapes.py']

model = dict(
    as_two_stage=True,
    mixed_selection=True,
    decoder=dict(look_forward_twice=True))
