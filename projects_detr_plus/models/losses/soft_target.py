"""Classification losses whose positives have a soft target.

Quality focal loss (mmdet) and the IoU-aware losses of the DINO family
(Align-DETR's IA-BCE, Stable-DINO's position-supervised loss) train a
positive query towards a *quality* of its box instead of 1.  The set-loss
core (:func:`~.set_losses.set_loss`) asks such a loss for that quality:
``soft_target(prob, iou)`` of each positive, passed through
``image_target(quality, image)`` (a step over each image's positives,
Stable-DINO's rescaling; none by default), times the positive's weight
(a one-to-k match's rank weight; 1 otherwise), and calls it with
``(labels, quality)``.
"""
from torch import Tensor, nn


class SoftTargetLoss(nn.Module):
    """Base of a classification loss called with ``(labels, quality)``.

    ``labels`` (M, ): class of each query (``num_classes``: background);
    ``quality`` (M, ): the soft target of the positives (0 elsewhere).
    Sigmoid-based: a head predicts ``num_classes`` logits.
    """
    use_sigmoid = True

    def soft_target(self, prob: Tensor, iou: Tensor) -> Tensor:
        """(P, ) soft targets of P positives from the predicted probability
        of their class (detached) and their box's IoU with its target."""
        raise NotImplementedError

    def image_target(self, quality: Tensor, image) -> Tensor:
        """(P, ) soft targets after a step over each image's positives;
        ``image`` (P, ) is the image of each (None where the targets do
        not say).  Unchanged by default."""
        return quality
