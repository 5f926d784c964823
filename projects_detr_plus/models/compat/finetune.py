"""Fine-tuning: load a checkpoint trained with another number of classes.

A COCO checkpoint (80 classes) loaded into a model for a user's dataset
(``num_classes=3``) has class-dependent weights that cannot fit: the class
branches of the head and of the encoder proposals, DINO's denoising label
embedding, the auxiliary heads' classifiers.  Every DETR+ detector drops
those from the incoming state dict before it is loaded, so they keep their
initialisation, and logs one line naming them (mmengine then lists the same
keys as missing from the checkpoint); everything else loads.

A weight counts as class-dependent when every dimension in which its shape
differs from the model's is, in both, a class count (C and K), a class
count + 1 (softmax classifiers) or 4 x a class count (class-specific box
regression), with one checkpoint class count K for all such weights.  Any
other shape mismatch is left to torch and mmengine to report.
"""
from mmengine.logging import print_log


def class_counts(ours, theirs, num_classes):
    """The checkpoint class counts K under which shape ``theirs`` becoming
    ``ours`` is a change from K to ``num_classes`` classes (empty: it is
    not one)."""
    if len(ours) != len(theirs) or ours == theirs:
        return set()
    counts = None
    for mine, other in zip(ours, theirs):
        if mine == other:
            continue
        options = set()
        for scale, extra in ((1, 0), (1, 1), (4, 0)):
            if mine == scale * num_classes + extra and other > extra and \
                    (other - extra) % scale == 0:
                options.add((other - extra) // scale)
        counts = options if counts is None else counts & options
    return counts


def drop_class_dependent_mismatches(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a detector (see the module doc)."""
    num_classes = module.bbox_head.num_classes
    own = module.state_dict()
    candidates = {}
    for key, value in state_dict.items():
        name = key[len(prefix):]
        if key.startswith(prefix) and name in own and hasattr(value, 'shape'):
            counts = class_counts(
                tuple(own[name].shape), tuple(value.shape), num_classes)
            if counts:
                candidates[key] = counts
    if not candidates:
        return
    votes = [k for counts in candidates.values() for k in counts]
    theirs = max(set(votes), key=votes.count)
    dropped = []
    for key, counts in candidates.items():
        if theirs in counts:
            name = key[len(prefix):]
            dropped.append(f'{name} {tuple(state_dict[key].shape)}->'
                           f'{tuple(own[name].shape)}')
            del state_dict[key]
    print_log(
        f'Checkpoint for {theirs} classes: {len(dropped)} class-dependent '
        f'weights keep their initialisation (num_classes={num_classes}): ' +
        ', '.join(dropped),
        logger='current',
        level=30)
