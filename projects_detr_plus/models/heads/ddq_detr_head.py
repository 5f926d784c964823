"""DDQ-DETR's head: DINO's head plus the dense queries' predictors.

The modules, and hence the state-dict keys, are those of mmdet's
``DDQDETRHead``, so its checkpoints load unchanged:

* ``cls_branches`` / ``reg_branches``: one per decoder layer, one for the
  encoder proposals of the main queries (index ``num_layers``) and one more
  (index ``num_layers + 1``) for the dense queries' encoder proposals;
* ``aux_cls_branches`` / ``aux_reg_branches``: one per decoder layer, which
  predict for the dense queries (``DenseQueryBranch``).

Everything else (the dense branch's loss, distinct-query selection) lives in
the branch and the detector; this head only holds modules and drops the
suppressed queries at prediction.
"""
import copy

from mmdet.models.dense_heads import DINOHead
from mmdet.registry import MODELS
from mmengine.model import bias_init_with_prob, constant_init
from torch import nn


@MODELS.register_module()
class DDQHeadPlus(DINOHead):
    """DINO head with DDQ's dense-query predictors.

    Args:
        aux_num_pos (int): positives per ground truth among the dense
            queries (one-to-many matching; 4 in DDQ-DETR).
        *args, **kwargs: as mmdet's ``DINOHead``.
    """

    def __init__(self, *args, aux_num_pos=4, **kwargs):
        if aux_num_pos < 1:
            raise ValueError(f'aux_num_pos must be >= 1, got {aux_num_pos}')
        self.aux_num_pos = aux_num_pos
        super().__init__(*args, **kwargs)

    def _init_layers(self):
        super()._init_layers()
        if not self.as_two_stage:
            raise ValueError('DDQHeadPlus needs as_two_stage=True')
        self.cls_branches.append(copy.deepcopy(self.cls_branches[-1]))
        self.reg_branches.append(copy.deepcopy(self.reg_branches[-1]))
        num_layers = self.num_pred_layer - 1
        self.aux_cls_branches = nn.ModuleList(
            copy.deepcopy(self.cls_branches[-1]) for _ in range(num_layers))
        self.aux_reg_branches = nn.ModuleList(
            copy.deepcopy(self.reg_branches[-1]) for _ in range(num_layers))

    def init_weights(self):
        """As mmdet's DDQ head: the dense predictors like the main ones."""
        super().init_weights()
        bias_init = bias_init_with_prob(0.01)
        for cls_branch in self.aux_cls_branches:
            nn.init.constant_(cls_branch.bias, bias_init)
        for reg_branch in self.aux_reg_branches:
            constant_init(reg_branch[-1], 0, bias=0)

    def forward(self, hidden_states, references, query_keep=None):
        """DINO's predictions; suppressed queries get a score of 0.

        Args:
            hidden_states (Tensor): (num_layers, bs, N, dim).
            references (list[Tensor]): (bs, N, 4) per layer, in [0, 1].
            query_keep (list[Tensor], optional): the distinct queries
                before each decoder layer after the first, (bs, N) bool;
                the last one marks the queries that may be predicted.

        Returns:
            tuple[Tensor, Tensor]: (num_layers, bs, N, num_classes) logits
            (``-inf`` at suppressed queries) and (num_layers, bs, N, 4)
            boxes.
        """
        cls_scores, bbox_preds = super().forward(hidden_states, references)
        if query_keep:
            suppressed = ~query_keep[-1][None, :, :, None]
            cls_scores = cls_scores.masked_fill(suppressed, float('-inf'))
        return cls_scores, bbox_preds

    def predict(self,
                hidden_states,
                references,
                batch_data_samples,
                rescale=True,
                query_keep=None):
        """Detections of the distinct queries of the last decoder layer."""
        metas = [s.metainfo for s in batch_data_samples]
        cls_scores, bbox_preds = self(hidden_states, references, query_keep)
        results = self.predict_by_feat(
            cls_scores, bbox_preds, batch_img_metas=metas, rescale=rescale)
        # fewer distinct candidates than max_per_img: drop the suppressed
        return [r[r.scores > 0] for r in results]
