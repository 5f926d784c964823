"""Fine-tuning: load a checkpoint trained with another number of classes.

A COCO checkpoint (80 classes) loaded into a model for a user's dataset
(``num_classes=3``) has class-dependent weights that cannot fit: the class
branches of the head and of the encoder proposals, DINO's denoising label
embedding, the auxiliary heads' classifiers.  Every DETR+ detector drops
those from the incoming state dict before it is loaded, so they keep their
initialisation, and logs one line naming them; everything else loads.  A
weight counts as class-dependent when its shape differs from the model's
and one of the model's dimensions is ``num_classes``, ``num_classes + 1``
(softmax classifiers) or ``4 * num_classes`` (class-specific box
regression).  Any other shape mismatch is left to
torch and mmengine to report.
"""
from mmengine.logging import print_log


def class_dependent(shape, num_classes):
    """Whether a parameter of ``shape`` depends on the number of classes."""
    return any(size in (num_classes, num_classes + 1, 4 * num_classes)
               for size in shape)


def drop_class_dependent_mismatches(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a detector (see the module doc)."""
    num_classes = module.bbox_head.num_classes
    own = module.state_dict()
    dropped = []
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name not in own or not hasattr(state_dict[key], 'shape'):
            continue
        theirs, ours = tuple(state_dict[key].shape), tuple(own[name].shape)
        if theirs != ours and class_dependent(ours, num_classes):
            dropped.append(f'{name} {theirs}->{ours}')
            del state_dict[key]
    if dropped:
        print_log(
            f'Checkpoint for another number of classes: {len(dropped)} '
            f'class-dependent weights keep their initialisation '
            f'(num_classes={num_classes}): {", ".join(dropped)}',
            logger='current', level=30)
