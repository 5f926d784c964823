"""DDQ FCN: mmdet's one-stage detector with :class:`~..heads.DDQFCNHead`.

Nothing else is new: the head makes its dense queries distinct and returns
NMS-free predictions, so the stock ``SingleStageDetector`` runs it (the
released code, ``jshilong/DDQ`` ``projects/configs/ddq_fcn``, uses it as
is).  The class gives the method its own registered name, and loads the
released checkpoints: their config lists the neck (``neck=[dict(type=
'FPN', ...)]``), which mmdet 2 wraps in a ``Sequential``, so their neck
weights are ``neck.0.*`` where ours are ``neck.*``.
"""
import torch.nn as nn
from mmdet.models.detectors import SingleStageDetector
from mmdet.registry import MODELS


@MODELS.register_module()
class DDQFCN(SingleStageDetector):
    """``SingleStageDetector`` whose ``bbox_head`` is a ``DDQFCNHead``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._register_load_state_dict_pre_hook(self._released_neck_names)

    def _released_neck_names(self, state_dict, prefix, *args):
        """Rename a released checkpoint's ``neck.0.*`` to ``neck.*`` (in
        place), unless our neck is itself a sequence."""
        old = f'{prefix}neck.0.'
        if isinstance(getattr(self, 'neck', None), nn.Sequential) or not any(
                k.startswith(old) for k in state_dict):
            return
        for key in [k for k in state_dict if k.startswith(old)]:
            new = f'{prefix}neck.' + key[len(old):]
            if new in state_dict:
                raise ValueError(f'checkpoint has both {key} and {new}')
            state_dict[new] = state_dict.pop(key)
