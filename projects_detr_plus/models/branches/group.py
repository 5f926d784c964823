"""Group DETR as a query branch: K - 1 more groups of main queries.

Group DETR (Chen et al., 2022) trains K groups of queries with shared
decoder weights: self-attention only inside a group, one-to-one matching
inside each group against the same ground truth.  At inference only the
first group (our main queries) runs, so the model is its base detector
and costs the same.

There is no official PyTorch Group-DINO; for a two-stage detector this
branch follows the authors' two-stage designs:

* **own proposals per group** (LW-DETR, same authors, ``models/
  transformer.py``; PaddleDetection's Group-DINO, ``group_detr_
  transformer.py``; a co-author in ConditionalDETR#29: "different heads
  to generate different groups of proposals"): each extra group has its
  own encoder output projection + LayerNorm, class head and box head, takes
  its own top-N anchors (ranked like the main ones, detached) and has its
  own encoder loss;
* **own denoising queries per group** (Paddle): each extra group has its
  own denoising branch (own label embedding, noise drawn independently),
  whose queries see that group's queries only;
* **equal weight for every group** (ConditionalDETR's GroupDETR, detrex,
  LW-DETR, Paddle: the losses divided by K): the main group's losses
  (decoder, encoder, denoising) are scaled by 1 / K (``main_loss_weight``)
  and this branch's mean over the extra groups by (K - 1) / K;
* own content table per group, initialised like the main content by the
  detector (Paddle leaves its extra groups at N(0, 1) while its first group
  is xavier-initialised; groups that are averaged as equals start equal
  here).

The heads are initialised as the detection head's encoder heads (class
bias at prior 0.01, last box layer zero: LW-DETR deep-copies them after that
initialisation).  ``shared_anchors=True`` is the cheaper variant: every
group reuses the main group's anchors, no per-group heads or encoder loss
(the per-group denoising does not depend on it).  Each group's encoder loss
is its detector's: DINO's covers the group's top N; on Deformable DETR it
covers every encoder token (as the main one), i.e. K - 1 more one-to-one
matchings over all tokens per image.

Groups are folded into the batch dimension for self-attention
(``num_groups`` of :class:`QuerySet`), which costs (K - 1) * N**2,
not (K * N)**2.  One :class:`~...task_modules.GroupOneToOneAssigner` call
per image matches all groups (one cost matrix, one Hungarian solve per
group), told the number of groups by an argument of the set-loss core.
"""
import torch
from mmcv.cnn import Linear
from mmdet.registry import MODELS
from mmengine.model import bias_init_with_prob, constant_init
from torch import nn

from ..losses.set_losses import matched_set_loss
from ..task_modules.group_assigner import GroupOneToOneAssigner
from .denoising import DenoisingBranch
from .protocol import QueryBranch
from .queries import QuerySet


@MODELS.register_module()
class GroupQueryBranch(QueryBranch):
    """K - 1 extra query groups matched one-to-one per group.

    Args:
        num_groups (int): K, the number of groups *including* the main one
            (11 in the paper).  1 adds nothing.
        shared_anchors (bool): every group takes the main group's anchors
            (no per-group encoder heads or encoder loss; denoising as
            without it).
        average_groups (bool): weigh all K groups equally (the authors'
            loss); False: main group weight 1, mean of the extra groups
            weight ``loss_weight``.
        loss_weight (float): multiplies this branch's losses.
        dn_cfg (dict, optional): per-group denoising as the detector's
            (filled in by DINOPlus from its own ``dn_cfg``).  ``dn_cfg=None``
            in the branch config keeps denoising on the main group only:
            cheaper, but not the authors' design.
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector; ``num_matching_queries`` is the group size N.
    """
    name = 'group'
    takes_dn_cfg = True

    def __init__(self,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 num_groups=11,
                 shared_anchors=False,
                 average_groups=True,
                 loss_weight=1.0,
                 dn_cfg=None):
        super().__init__()
        if num_groups < 1:
            raise ValueError(f'num_groups must be >= 1, got {num_groups}')
        self.num_extra_groups = num_groups - 1
        self.group_size = num_matching_queries
        self.shared_anchors = shared_anchors
        self.loss_weight = loss_weight
        self.main_loss_weight = 1.0 / num_groups if average_groups else 1.0
        if average_groups:
            self.loss_weight *= self.num_extra_groups / num_groups
        self.content = nn.Embedding(self.num_extra_groups * self.group_size,
                                    embed_dims)
        extra = range(self.num_extra_groups)
        if not shared_anchors:
            self.memory_trans_fc = nn.ModuleList(
                nn.Linear(embed_dims, embed_dims) for _ in extra)
            self.memory_trans_norm = nn.ModuleList(
                nn.LayerNorm(embed_dims) for _ in extra)
            self.enc_cls = nn.ModuleList(
                Linear(embed_dims, num_classes) for _ in extra)
            self.enc_reg = nn.ModuleList(
                _box_branch(embed_dims) for _ in extra)
        self.denoisers = nn.ModuleList()
        if dn_cfg is not None:
            self.denoisers.extend(
                DenoisingBranch(
                    num_classes=num_classes,
                    embed_dims=embed_dims,
                    num_matching_queries=num_matching_queries,
                    **dn_cfg) for _ in extra)

    def init_weights(self):
        """Encoder heads as the detection head's, projections xavier."""
        if self.shared_anchors:
            return
        for fc in self.memory_trans_fc:
            nn.init.xavier_uniform_(fc.weight)
        for cls in self.enc_cls:
            nn.init.constant_(cls.bias, bias_init_with_prob(0.01))
        for reg in self.enc_reg:
            constant_init(reg[-1], 0, bias=0)

    def content_tables(self):
        """One (N, dim) table per extra group (views of ``content``)."""
        size = self.group_size
        return [
            self.content.weight[g * size:(g + 1) * size]
            for g in range(self.num_extra_groups)
        ]

    def make_queries(self, main, context, detector, batch_data_samples):
        """Each extra group: its own anchors (its encoder heads on
        ``context.memory``, selected by ``detector.select_proposals``) and
        content, then its own denoising queries.

        Returns:
            QuerySet: (bs, (K - 1) * (N + D), ...), group g being
            queries ``[g * (N + D), (g + 1) * (N + D))``: its N matching
            queries, then its D denoising queries.
        """
        bs = main.query.shape[0]
        anchors, enc_losses = self._group_anchors(main, context, detector)
        contents = [t[None].expand(bs, -1, -1) for t in self.content_tables()]
        dn = [
            d.make_queries(main, context, detector, batch_data_samples)
            for d in self.denoisers
        ]
        if len({part.num_queries for part in dn}) > 1:
            raise RuntimeError('GroupQueryBranch: the groups got different '
                               'numbers of denoising queries')
        query, reference = [main.query[:, :0]], [main.reference[:, :0]]
        for g in range(self.num_extra_groups):
            query += [contents[g]] + [d.query for d in dn[g:g + 1]]
            reference += [anchors[g]] + [d.reference for d in dn[g:g + 1]]
        return QuerySet(
            self.name,
            torch.cat(query, 1),
            torch.cat(reference, 1),
            attn_mask=self._group_mask(dn[0]) if dn else None,
            num_groups=max(self.num_extra_groups, 1),
            meta=dict(enc_losses=enc_losses, dn=dn))

    def _group_anchors(self, main, context, detector):
        """Per extra group: anchors (bs, N, 4) before the sigmoid
        (detached) and the inputs of its encoder loss (None if shared)."""
        if self.shared_anchors:
            return [main.reference] * self.num_extra_groups, []
        enc_anchors = context.enc_anchors
        valid = torch.isfinite(enc_anchors).all(-1, keepdim=True)
        tokens = context.memory.masked_fill(~valid, 0.0)
        anchors, enc_losses = [], []
        for g in range(self.num_extra_groups):
            enc_memory = self.memory_trans_norm[g](
                self.memory_trans_fc[g](tokens))
            coords, loss_inputs = detector.select_proposals(
                self.enc_cls[g](enc_memory),
                self.enc_reg[g](enc_memory) + enc_anchors)
            anchors.append(coords.detach())
            enc_losses.append(loss_inputs)
        return anchors, enc_losses

    def _group_mask(self, dn):
        """(N + D, N + D), True = blocked: matching queries see each other
        only, denoising queries see the matching ones and their own
        denoising group (DINO's mask, per query group)."""
        size, num_dn = self.group_size, dn.num_queries
        mask = dn.query.new_zeros(
            size + num_dn, size + num_dn, dtype=torch.bool)
        mask[:size, size:] = True
        mask[size:, size:] = dn.attn_mask
        return mask

    def loss(self, detector, predictions, queries, batch_data_samples):
        """Per-group decoder, encoder and denoising losses, each the mean
        over the extra groups, times ``loss_weight``; the predictions are
        (num_layers, bs, (K-1) * (N + D), ...).
        """
        if self.num_extra_groups == 0:
            return {}
        head = detector.bbox_head
        if not isinstance(head.assigner, GroupOneToOneAssigner):
            raise TypeError(
                'GroupQueryBranch needs the head to match with '
                "train_cfg.assigner.type='GroupOneToOneAssigner', got "
                f'{type(head.assigner).__name__}')
        cls_groups = predictions.cls_scores.unflatten(
            2, (self.num_extra_groups, -1))
        bbox_groups = predictions.bbox_preds.unflatten(
            2, (self.num_extra_groups, -1))
        size = self.group_size
        gts = [s.gt_instances for s in batch_data_samples]
        metas = [s.metainfo for s in batch_data_samples]
        losses = matched_set_loss(
            head,
            f'{self.name}_',
            cls_groups[:, :, :, :size].flatten(2, 3),
            bbox_groups[:, :, :, :size].flatten(2, 3),
            gts,
            metas,
            self.loss_weight,
            num_groups=self.num_extra_groups)
        for inputs in queries.meta['enc_losses']:  # per-group proposals
            self._add_group_mean(losses,
                                 detector.encoder_loss(*inputs, gts, metas))
        stride = queries.group_size  # N + D
        for g, (denoiser,
                dn) in enumerate(zip(self.denoisers, queries.meta['dn'])):
            group_dn = predictions.queries(
                slice(g * stride + size, (g + 1) * stride))
            self._add_group_mean(
                losses,
                denoiser.loss(detector, group_dn, dn, batch_data_samples))
        return losses

    def _add_group_mean(self, losses, group_losses):
        """Add one extra group's share of the mean, times ``loss_weight``,
        under this branch's prefix (``d0.dn_loss_cls`` becomes
        ``d0.group_dn_loss_cls``)."""
        weight = self.loss_weight / self.num_extra_groups
        for key, value in group_losses.items():
            layer, _, name = key.rpartition('.')
            key = f'{layer}.{self.name}_{name}' if layer else \
                f'{self.name}_{name}'
            losses[key] = losses.get(key, 0) + value * weight

    def extra_repr(self):
        return (f'num_groups={self.num_extra_groups + 1}, '
                f'group_size={self.group_size}, '
                f'shared_anchors={self.shared_anchors}')


def _box_branch(dims, num_hidden=2):
    """The DETR heads' box branch (same layers and state-dict keys):
    ``num_hidden`` x (Linear, ReLU), then Linear(dims, 4)."""
    layers = []
    for _ in range(num_hidden):
        layers += [Linear(dims, dims), nn.ReLU()]
    return nn.Sequential(*layers, Linear(dims, 4))
