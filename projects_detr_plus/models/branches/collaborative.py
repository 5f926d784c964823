"""Co-DETR's collaborative hybrid assignment as a query branch.

Co-DETR (Zong et al., 2023) trains auxiliary one-to-many heads (ATSS, FCOS,
Faster R-CNN) on the encoder output, which gives the encoder many more
positives than one-to-one matching does, and turns each head's positive
anchors / proposals into *customized positive queries*: decoded by the
shared decoder, each with the target its head assigned (no matching).  At
inference the heads and queries are gone: a plain DINO, no NMS.

This branch holds one auxiliary head (:mod:`..aux_heads`).  In training, as
the official code (``CoDINOHead.get_aux_targets`` / ``forward_aux`` of
Sense-X/Co-DETR and mmdet's ``projects/CO-DETR``):

1. the head trains on the encoder pyramid (the memory cut back into
   per-level maps plus one stride-2 level that the detector shares between
   all its auxiliary heads, :func:`~..layers.pyramid.encoder_pyramid`)
   and returns every anchor / sampled proposal with its target;
2. per image, the positives (a random ``max_queries`` of them when there
   are more) are padded with random negatives of the same head up to the
   batch's count, at least ``min_queries``: the negatives are trained as
   background and seen by the other queries of the branch;
3. reference = the anchor's box (cx, cy, w, h, normalised), detached;
   content = a linear map + LayerNorm of its sine embedding
   (``get_proposal_pos_embed``, 2 * dim features);
4. the queries see only each other (masked from the main queries both
   ways) and are trained with the head's targets, weight ``loss_weight``
   (lambda_1 = 1): classification of every query, normalised by the number
   of positives, box losses of the positives.

``zero_padding=True`` is the official ``use_zero_padding`` option: pad with
masked, zero-weight queries instead of negatives (the official Co-DINO
builds that mask but does not pass it to its decoder; we mask).

Where we differ from the official code: a query's first reference box is
its anchor clamped to the image ([0, 1]); the official one is the raw
anchor, which is larger than the image for the largest ATSS anchors.

Co-Deformable-DETR builds its queries differently (official
``CoDeformableDetrTransformer.forward_aux``): the linear map gives
``2 * dim`` features split into positional and content query
(``own_query_pos``, as Deformable DETR's two-stage ``pos_trans``), the
content adds a linear map + LayerNorm of the candidate's feature
(``coord_feat``) and the positional query a learnable per-head embedding
(``head_embedding``).
"""
import torch
from mmdet.models.detectors import DeformableDETR
from mmdet.models.layers.transformer.utils import inverse_sigmoid
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox_xyxy_to_cxcywh
from torch import nn

from ..compat.co_detr_checkpoints import convert_official_co_detr
from ..losses.set_losses import fixed_targets, layer_loss_dict, layer_losses
from .protocol import QueryBranch
from .queries import QuerySet


def _check_num_classes(aux_head, num_classes, name):
    """The auxiliary head takes the detector's ``num_classes``; a config
    that sets another one somewhere gets an error naming every place."""
    places = {f'{name}.aux_head.num_classes': aux_head.get('num_classes')}
    box_head = (aux_head.get('roi_head') or {}).get('bbox_head') or {}
    places[f'{name}.aux_head.roi_head.bbox_head.num_classes'] = \
        box_head.get('num_classes')
    wrong = {
        k: v
        for k, v in places.items() if v is not None and v != num_classes
    }
    if wrong:
        raise ValueError(
            f'num_classes is inconsistent: bbox_head.num_classes='
            f'{num_classes}, but ' + ', '.join(f'{k}={v}'
                                               for k, v in wrong.items()) +
            '. Set it once, in bbox_head; the query branches and their '
            'auxiliary heads take it from there.')


def _random_subset(indices, count):
    """``count`` of ``indices`` (1-D) at random, in their order."""
    if len(indices) <= count:
        return indices
    keep = torch.randperm(len(indices), device=indices.device)[:count]
    return indices[keep.sort().values]


@MODELS.register_module()
class CollaborativeBranch(QueryBranch):
    """An auxiliary one-to-many head and its customized positive queries.

    Args:
        aux_head (dict): a head from :mod:`..aux_heads` (``num_classes``
            is filled in).
        name (str): branch name and loss-key prefix, e.g. ``'co_atss'``.
        max_queries (int): most positive queries per image (official
            ``max_pos_coords`` = 300).
        min_queries (int): fewest queries per image (official: 9).
        zero_padding (bool): pad with masked zero-weight queries instead of
            negatives (official ``use_zero_padding``, off by default).
        loss_weight (float): weight of the queries' losses (lambda_1).
        own_query_pos (bool): the queries bring their positional query
            (Co-Deformable-DETR; the detector must take ``query_pos``).
        coord_feat (bool): add the candidate's feature to the content
            (official ``with_coord_feat``: Co-Deformable-DETR).
        head_embedding (str, optional): ``'scalar'``: one learnable number
            added to the positional queries (Co-Deformable-DETR's R50
            ``head_pos_embed``, a ``(num_heads, 1)`` table the authors
            keep "for reproducing our results"); ``'vector'``: one
            ``dim``-vector (the fix they suggest); None.  Initialised as
            the official 2-head table: the transformer's xavier-uniform
            (U(-sqrt(2), sqrt(2)) for the scalar), which also overrides the
            table's ``padding_idx``.
        num_classes, embed_dims, num_matching_queries (int): filled in by the
            detector.
    """
    uses_encoder_pyramid = True  # the detector fills ``encoder_pyramid``
    # official Co-DETR checkpoints load into the detector
    checkpoint_converter = staticmethod(convert_official_co_detr)

    def __init__(self,
                 aux_head,
                 num_classes,
                 embed_dims,
                 num_matching_queries,
                 name='co',
                 max_queries=300,
                 min_queries=9,
                 zero_padding=False,
                 loss_weight=1.0,
                 own_query_pos=False,
                 coord_feat=False,
                 head_embedding=None):
        super().__init__()
        if not 0 < min_queries <= max_queries:
            raise ValueError(f'{name}: need 0 < min_queries <= max_queries, '
                             f'got {min_queries} and {max_queries}')
        if head_embedding not in (None, 'scalar', 'vector'):
            raise ValueError(f"{name}: head_embedding must be None, 'scalar' "
                             f"or 'vector', got {head_embedding!r}")
        if head_embedding and not own_query_pos:
            raise ValueError(f'{name}: head_embedding is added to the '
                             'queries\' own query_pos: set own_query_pos')
        self.name = name
        self.max_queries = max_queries
        self.min_queries = min_queries
        self.zero_padding = zero_padding
        self.loss_weight = loss_weight
        self.num_classes = num_classes
        _check_num_classes(aux_head, num_classes, name)
        self.aux_head = MODELS.build(dict(aux_head, num_classes=num_classes))
        self.embed_dims = embed_dims
        self.own_query_pos = own_query_pos
        out_dims = embed_dims * 2 if own_query_pos else embed_dims
        self.content = nn.Sequential(
            nn.Linear(embed_dims * 2, out_dims), nn.LayerNorm(out_dims))
        self.feat_proj = None
        if coord_feat:
            self.feat_proj = nn.Sequential(
                nn.Linear(embed_dims, embed_dims), nn.LayerNorm(embed_dims))
        self.head_embedding = None
        if head_embedding:
            size = 1 if head_embedding == 'scalar' else embed_dims
            self.head_embedding = nn.Parameter(torch.empty(size))
            self._init_head_embedding()  # never left uninitialised

    def init_weights(self):
        """The head's initialisation; xavier-uniform for the query maps
        (the official ones live in the transformer, whose ``init_weights``
        does that to every matrix)."""
        super().init_weights()
        for proj in (self.content, self.feat_proj):
            if proj is not None:
                nn.init.xavier_uniform_(proj[0].weight)
        if self.head_embedding is not None:
            self._init_head_embedding()

    def _init_head_embedding(self):
        """Xavier-uniform of a row of the official (2, size) table."""
        bound = (6.0 / (2 + len(self.head_embedding)))**0.5
        nn.init.uniform_(self.head_embedding, -bound, bound)

    def make_queries(self, main, context, detector, batch_data_samples):
        """Train the auxiliary head on ``context.encoder_pyramid``; its
        positives (and negatives) as queries.

        Returns:
            QuerySet: (bs, P, dim) queries on the candidates' boxes,
            P = max(min_queries, the most positives of an image, at most
            ``max_queries``); ``meta`` holds the targets and the head's
            losses (reported by :meth:`loss`).  The head's loss is computed
            here, in the pass that assigns its candidates: the R-CNN head
            samples its RoIs at random, so its loss and the queries must
            come from the same assignment.
        """
        encoder_pyramid = context.encoder_pyramid
        if encoder_pyramid is None:
            raise ValueError(f'{self.name}: the detector passed no '
                             'encoder_pyramid (not a QueryBranchDetector?)')
        aux_losses, candidates = self.aux_head.loss_and_candidates(
            encoder_pyramid,
            batch_data_samples,
            with_feats=self.feat_proj is not None)
        targets = self._queries_targets(
            candidates, [s.metainfo for s in batch_data_samples],
            like=encoder_pyramid[0])
        reference = inverse_sigmoid(targets.pop('priors'))
        content, query_pos = self._embed(reference, targets.pop('feats', None))
        return QuerySet(
            self.name,
            content,
            reference,
            padding=targets['label_weights'] == 0,
            query_pos=query_pos,
            meta=dict(targets, aux_losses=aux_losses))

    def _embed(self, reference, feats):
        """Content (bs, P, dim) and positional query (bs, P, dim, or None)
        of anchors ``reference`` (bs, P, 4, before the sigmoid) with
        features ``feats`` (bs, P, dim)."""
        sine = DeformableDETR.get_proposal_pos_embed(
            reference, num_pos_feats=self.embed_dims // 2)
        content, query_pos = self.content(sine), None
        if self.own_query_pos:
            query_pos, content = content.split(self.embed_dims, dim=-1)
        if self.feat_proj is not None:
            content = content + self.feat_proj(feats)
        if self.head_embedding is not None:
            query_pos = query_pos + self.head_embedding
        return content, query_pos

    def _choose(self, labels, count):
        """Indices of an image's positives (at most ``count``) and of the
        negatives that pad them to ``count`` (fewer if there are not
        enough)."""
        positive = labels < self.num_classes
        pos = _random_subset(positive.nonzero()[:, 0], count)
        if self.zero_padding:
            return pos, pos[:0]
        neg = _random_subset((~positive).nonzero()[:, 0], count - len(pos))
        return pos, neg

    def _queries_targets(self, candidates, metas, like):
        """(bs, P, ...) priors and targets (normalised cxcywh, detached),
        labels (background = ``num_classes``), classification weights (0 at
        padding), box weights (1 at positives) and, when the candidates
        have them, features (0 at padding)."""
        most = max(
            int((c.labels < self.num_classes).sum()) for c in candidates)
        count = max(self.min_queries, min(self.max_queries, most))
        bs = len(candidates)
        priors = like.new_full((bs, count, 4), 0.5)
        boxes = like.new_full((bs, count, 4), 0.5)
        labels = torch.full((bs, count),
                            self.num_classes,
                            dtype=torch.long,
                            device=like.device)
        label_weights = like.new_zeros(bs, count)
        bbox_weights = like.new_zeros(bs, count)
        feats = None
        if 'feats' in candidates[0]:
            feats = like.new_zeros(bs, count, candidates[0].feats.shape[-1])
        for i, (cand, meta) in enumerate(zip(candidates, metas)):
            pos, neg = self._choose(cand.labels, count)
            chosen = torch.cat([pos, neg])
            n = len(chosen)
            h, w = meta['img_shape'][:2]
            scale = like.new_tensor([w, h, w, h])
            priors[i, :n] = bbox_xyxy_to_cxcywh(cand.priors[chosen]) / scale
            boxes[i, :n] = bbox_xyxy_to_cxcywh(cand.bboxes[chosen]) / scale
            labels[i, :n] = cand.labels[chosen]
            if feats is not None:
                feats[i, :n] = cand.feats[chosen]
            label_weights[i, :n] = 1.0
            bbox_weights[i, :len(pos)] = 1.0
        targets = dict(
            priors=priors.detach(),
            bbox_targets=boxes.detach(),
            labels=labels,
            label_weights=label_weights,
            bbox_weights=bbox_weights)
        if feats is not None:
            targets['feats'] = feats
        return targets

    def loss(self, detector, predictions, queries, batch_data_samples):
        """The head's losses plus the queries' fixed-target loss."""
        meta, head = queries.meta, detector.bbox_head
        losses = {
            f'{self.name}.{key}': value
            for key, value in meta['aux_losses'].items()
        }
        # computed even without queries: its normaliser is a collective
        targets = fixed_targets(meta['labels'], meta['bbox_targets'],
                                meta['label_weights'], meta['bbox_weights'],
                                [s.metainfo for s in batch_data_samples],
                                head.num_classes)
        losses.update(
            layer_loss_dict(
                f'{self.name}_',
                layer_losses(head, predictions.cls_scores,
                             predictions.bbox_preds, targets),
                self.loss_weight))
        return losses
