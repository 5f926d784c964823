"""Official Co-DETR checkpoints in the DETR+ layout.

Co-DINO checkpoints of mmdet's ``projects/CO-DETR`` and of the original
Sense-X/Co-DETR (mmdet 2.x) name their weights after the old mmcv
transformer (``query_head.transformer.encoder.layers.N.attentions.0``,
``ffns.0``, ...) and keep the auxiliary heads at the top level
(``rpn_head``, ``roi_head.0``, ``bbox_head.0``).  DETR+'s Co-DINO is mmdet's
``DINO`` plus one :class:`~.branches.CollaborativeBranch` per auxiliary
head; its Co-Deformable-DETR (Sense-X) is mmdet's ``DeformableDETR``
(refine, two-stage, mixed selection) plus such branches, whose
``feat_proj`` and ``head_embedding`` are the official transformer's
``pos_feats_trans`` / ``pos_feats_norm`` and the rows of its
``head_pos_embed`` table (:func:`split_head_pos_embed`).
:func:`convert_official_co_detr`, a ``load_state_dict`` pre-hook of
the detector, renames such a checkpoint's keys into ours, so that
``load_from`` / ``load_checkpoint`` take official checkpoints directly;
:func:`official_key_map` is the renaming itself (also used by
``tools/convert_co_detr_checkpoint.py``).

Where the two official layouts differ:

* denoising label embedding: ``query_head.dn_generator.label_embedding``
  (mmdet) or ``query_head.label_embedding`` (Sense-X; the reason
  mmdet's port does not load Sense-X checkpoints strictly, mmdet #11482);
  both become ``dn_query_generator.label_embedding``.

The auxiliary heads map by kind, not by our branch order: the official
model numbers them RoI heads first (``rpn_head`` + ``roi_head.0`` = aux
index 0, the index of ``transformer.aux_pos_trans.0``), then the one-stage
heads (``bbox_head.0``, ATSS = aux index 1). A kind is ``'rcnn'`` (an R-CNN
head, :class:`~.aux_heads.CoRCNNHead`) or a one-stage head's kind, told
apart by the layers its checkpoint carries (:data:`ONE_STAGE_KINDS`: ATSS
has ``atss_cls``, FCOS ``conv_centerness``, ...), so a config that lists
FCOS before ATSS still gets each head's own weights; official heads of one
kind go to our branches of that kind in order. A branch's ``content``
(Linear, LayerNorm) is the official ``aux_pos_trans`` /
``aux_pos_trans_norm`` of its head, and the extra stride-2 pyramid level
shared by the heads (official ``query_head.downsample``) is the detector's
``encoder_extra_level``.
"""
import re

from mmengine.logging import print_log

from ..aux_heads import CoRCNNHead

QUERY_HEAD = 'query_head.'
#: Co-Deformable-DETR's per-head positional embedding, a (heads, size)
#: table; :func:`split_head_pos_embed` makes it one key per head
HEAD_POS_EMBED = 'query_head.transformer.head_pos_embed'
RCNN = 'rcnn'
ONE_STAGE = 'one-stage'  # a one-stage head of no kind below
#: one-stage kind -> a layer name that only that head's state dict has
ONE_STAGE_KINDS = {
    'atss': 'atss_cls.',
    'fcos': 'conv_centerness.',
    'retina': 'retina_cls.'
}

#: official ``query_head.`` names -> ours: (regex matched at the start of
#: the name after ``query_head.``, replacement of the matched part)
QUERY_HEAD_RULES = (
    (r'transformer\.level_embeds$', 'level_embed'),
    (r'transformer\.enc_output\.', 'memory_trans_fc.'),
    (r'transformer\.enc_output_norm\.', 'memory_trans_norm.'),
    (r'transformer\.query_embed\.', 'query_embedding.'),
    # Co-Deformable-DETR: mixed selection's content queries, the two-stage
    # proposals' positional-query projection
    (r'query_embedding\.', 'query_embedding.'),
    (r'transformer\.pos_trans\.', 'pos_trans_fc.'),
    (r'transformer\.pos_trans_norm\.', 'pos_trans_norm.'),
    (r'transformer\.encoder\.layers\.(\d+)\.attentions\.0\.',
     r'encoder.layers.\1.self_attn.'),
    (r'transformer\.encoder\.layers\.(\d+)\.ffns\.0\.',
     r'encoder.layers.\1.ffn.'),
    (r'transformer\.encoder\.layers\.(\d+)\.norms\.([01])\.',
     r'encoder.layers.\1.norms.\2.'),
    (r'transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.',
     r'decoder.layers.\1.self_attn.attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.attentions\.1\.',
     r'decoder.layers.\1.cross_attn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.ffns\.0\.',
     r'decoder.layers.\1.ffn.'),
    (r'transformer\.decoder\.layers\.(\d+)\.norms\.([012])\.',
     r'decoder.layers.\1.norms.\2.'),
    (r'transformer\.decoder\.ref_point_head\.0\.',
     'decoder.ref_point_head.layers.0.'),
    (r'transformer\.decoder\.ref_point_head\.2\.',
     'decoder.ref_point_head.layers.1.'),
    (r'transformer\.decoder\.norm\.', 'decoder.norm.'),
    (r'(cls|reg)_branches\.', r'bbox_head.\1_branches.'),
    (r'downsample\.', 'encoder_extra_level.'),
    (r'(dn_generator\.)?label_embedding\.',
     'dn_query_generator.label_embedding.'),
)
#: official top-level modules whose keys are ours unchanged
SAME_NAMES = ('backbone.', 'neck.')


def is_official_layout(names):
    """Whether state-dict keys ``names`` (without the module's prefix) are
    an official Co-DETR checkpoint's (they have a ``query_head``)."""
    return any(name.startswith(QUERY_HEAD) for name in names)


def one_stage_kind(names):
    """The kind of a one-stage head from its state-dict keys (without
    its prefix): a key of :data:`ONE_STAGE_KINDS`, else
    :data:`ONE_STAGE`."""
    for kind, layer in ONE_STAGE_KINDS.items():
        if any(name.startswith(layer) for name in names):
            return kind
    return ONE_STAGE


def head_kind(head):
    """The kind of an auxiliary head module (None: no head)."""
    if head is None:
        return None
    if isinstance(head, CoRCNNHead):
        return RCNN
    return one_stage_kind(list(head.state_dict()))


def branch_kinds(detector):
    """Per ``detector.extra_branches`` entry: its auxiliary head's kind
    (:func:`head_kind`; None for a branch without one)."""
    return [
        head_kind(getattr(branch, 'aux_head', None))
        for branch in getattr(detector, 'extra_branches', ())
    ]


def branch_kinds_from_config(branches):
    """:func:`branch_kinds` of a detector config's ``branches`` list,
    without building it (``aux_head.type`` decides: mmdet's ATSS, FCOS and
    RetinaNet heads and their subclasses have the layers of their kind)."""
    from mmdet.models.dense_heads import ATSSHead, FCOSHead, RetinaHead
    from mmdet.registry import MODELS
    classes = {'atss': ATSSHead, 'fcos': FCOSHead, 'retina': RetinaHead}
    kinds = []
    for cfg in branches:
        head_type = (cfg.get('aux_head') or {}).get('type')
        if isinstance(head_type, str):
            head_type = MODELS.get(head_type)
        if head_type is None:
            kinds.append(None)
        elif issubclass(head_type, CoRCNNHead):
            kinds.append(RCNN)
        else:
            kinds.append(
                next((kind for kind, cls in classes.items()
                      if issubclass(head_type, cls)), ONE_STAGE))
    return kinds


class _AuxLayout:
    """Where each official auxiliary module goes among our branches."""

    def __init__(self, names, kinds):
        self.rcnn = [i for i, k in enumerate(kinds) if k == RCNN]
        # official aux index j: RoI heads first, then one-stage heads
        self.num_roi = len({
            int(m.group(1))
            for m in (re.match(r'roi_head\.(\d+)\.', n) for n in names) if m
        })
        self.one_stage = self._one_stage_branches(names, kinds)
        if not self.num_roi and not self.one_stage:
            # no auxiliary heads in the checkpoint (trimmed): the query
            # modules follow the official order of our branches' kinds
            self.num_roi = len(self.rcnn)
            self.one_stage = dict(
                enumerate(i for i, k in enumerate(kinds)
                          if k not in (RCNN, None)))

    @staticmethod
    def _one_stage_branches(names, kinds):
        """{official ``bbox_head`` index: our branch}: the n-th official
        head of a kind goes to our n-th branch of that kind."""
        keys = {}
        for name in names:
            match = re.match(r'bbox_head\.(\d+)\.(.*)$', name)
            if match:
                keys.setdefault(int(match.group(1)), []).append(match.group(2))
        taken, branches = {}, {}
        for index in sorted(keys):
            kind = one_stage_kind(keys[index])
            ours = [i for i, k in enumerate(kinds) if k == kind]
            branches[index] = _at(ours, taken.get(kind, 0))
            taken[kind] = taken.get(kind, 0) + 1
        return branches

    def roi(self, index):
        """Our branch of official ``roi_head.{index}`` (None: none)."""
        return _at(self.rcnn, index)

    def one_stage_head(self, index):
        """Our branch of official ``bbox_head.{index}``."""
        return self.one_stage.get(index)

    def rpn(self):
        """Our branch of the official ``rpn_head`` (one R-CNN branch)."""
        return self.rcnn[0] if len(self.rcnn) == 1 else None

    def aux(self, index):
        """Our branch of official aux index ``index``
        (``transformer.aux_pos_trans.{index}``)."""
        if index < self.num_roi:
            return self.roi(index)
        return self.one_stage_head(index - self.num_roi)


def _at(items, index):
    return items[index] if index < len(items) else None


def _branch(index, rest):
    return None if index is None else f'extra_branches.{index}.{rest}'


def _aux_name(name, layout):
    """Our name of an official auxiliary-head key (None: none)."""
    match = re.match(
        r'query_head\.transformer\.(aux_pos_trans|pos_feats_trans)(_norm|)'
        r'\.(\d+)\.(.*)$',
        re.sub(r'pos_feats_norm', 'pos_feats_trans_norm', name))
    if match:
        module, norm, index, rest = match.groups()
        ours = 'content' if module == 'aux_pos_trans' else 'feat_proj'
        return _branch(
            layout.aux(int(index)), f'{ours}.{1 if norm else 0}.{rest}')
    match = re.match(rf'{re.escape(HEAD_POS_EMBED)}\.(\d+)$', name)
    if match:
        return _branch(layout.aux(int(match.group(1))), 'head_embedding')
    match = re.match(r'(roi_head|bbox_head)\.(\d+)\.(.*)$', name)
    if match:
        module, index, rest = match.groups()
        if module == 'roi_head':
            return _branch(layout.roi(int(index)), f'aux_head.roi_head.{rest}')
        return _branch(layout.one_stage_head(int(index)), f'aux_head.{rest}')
    if name.startswith('rpn_head.'):
        return _branch(layout.rpn(), f'aux_head.{name}')
    return None


def official_name(name, layout):
    """Our name of official key ``name`` (None: it has none)."""
    if name.startswith(SAME_NAMES):
        return name
    if name.startswith(QUERY_HEAD):
        rest = name[len(QUERY_HEAD):]
        for pattern, replacement in QUERY_HEAD_RULES:
            match = re.match(pattern, rest)
            if match:
                return match.expand(replacement) + rest[match.end():]
    return _aux_name(name, layout)


def official_key_map(names, kinds, targets=None):
    """Rename official Co-DETR keys into ours.

    Args:
        names (list[str]): the checkpoint's keys.
        kinds (list): :func:`branch_kinds` of the detector they load into.
        targets (set[str], optional): the detector's state-dict keys; a
            name of ours that is not among them counts as unmapped (e.g.
            Co-Deformable-DETR's ``pos_feats_trans`` for a branch without
            ``coord_feat``).

    Returns:
        tuple[dict, list]: ``{official: ours}`` for every key that has a
        name of ours, and the keys that have none (sorted).

    Raises:
        ValueError: two official keys that would get the same name.
    """
    layout = _AuxLayout(names, kinds)
    mapping, unmapped = {}, []
    for name in names:
        ours = official_name(name, layout)
        if ours is None or (targets is not None and ours not in targets):
            unmapped.append(name)
        else:
            mapping[name] = ours
    _check_unique(mapping)
    return mapping, sorted(unmapped)


def _check_unique(mapping):
    seen = {}
    for old, new in mapping.items():
        if new in seen:
            raise ValueError(f'official keys {seen[new]!r} and {old!r} both '
                             f'map to {new!r}')
        seen[new] = old


def unmapped_error(unmapped, kinds):
    """The error for official keys that have no name of ours."""
    return ValueError(
        f'official Co-DETR checkpoint: {len(unmapped)} keys have no '
        f'counterpart in this detector (auxiliary branches by kind: '
        f'{kinds}): ' + ', '.join(unmapped) + '. The detector must have '
        'the checkpoint\'s heads (one R-CNN branch per roi_head, one '
        'other branch per bbox_head, denoising on); or convert it with '
        'tools/convert_co_detr_checkpoint.py --drop-unmapped.')


def split_head_pos_embed(state_dict, prefix=''):
    """Official ``head_pos_embed.weight`` (aux heads, size), in place, as
    one ``head_pos_embed.{index}`` (size, ) per auxiliary head index: each
    row goes to its head's branch (``head_embedding``)."""
    key = f'{prefix}{HEAD_POS_EMBED}.weight'
    if key in state_dict:
        table = state_dict.pop(key)
        for index, row in enumerate(table):
            state_dict[f'{prefix}{HEAD_POS_EMBED}.{index}'] = row.clone()


def convert_backbone(module, state_dict, prefix):
    """Check, and where needed rename, the backbone of an official
    checkpoint in place: Sense-X's Swin checkpoints carry the original Swin
    implementation's names (``backbone.layers.N``, ``patch_embed.proj``),
    which mmdet's ``swin_converter`` turns into its ``SwinTransformer``'s
    (the patch-merging channel order included).  Then every backbone weight
    of ``module`` must be in the checkpoint, with its shape.

    Raises:
        ValueError: naming the backbone weights that are missing or do not
            fit, instead of leaving the backbone at its initialisation.
    """
    ours = {
        k: v
        for k, v in module.state_dict().items() if k.startswith('backbone.')
    }
    start = len(prefix)
    theirs = [k for k in state_dict if k.startswith(prefix + 'backbone.')]
    if any(k[start:].startswith('backbone.layers.') for k in theirs) and any(
            k.startswith('backbone.stages.') for k in ours):
        from mmdet.models.backbones.swin import swin_converter
        converted = swin_converter(
            {k[start + len('backbone.'):]: state_dict.pop(k)
             for k in theirs})
        state_dict.update({prefix + k: v for k, v in converted.items()})
        print_log(
            f'Official Co-DETR checkpoint: {len(converted)} Swin '
            'backbone keys renamed into mmdet\'s SwinTransformer',
            logger='current')
    missing = [k for k in ours if prefix + k not in state_dict]
    misfit = [
        k for k in ours if prefix +
        k in state_dict and state_dict[prefix + k].shape != ours[k].shape
    ]
    if missing or misfit:
        raise ValueError(
            f'official Co-DETR checkpoint: its backbone does not fit this '
            f'detector\'s ({type(module.backbone).__name__}): '
            f'{len(missing)} of {len(ours)} backbone weights missing '
            f'({", ".join(missing[:5])}{", ..." if len(missing) > 5 else ""})'
            f', {len(misfit)} of another shape ({", ".join(misfit[:5])}); '
            'the config\'s backbone must be the checkpoint\'s')


def convert_official_co_detr(module, state_dict, prefix, *args):
    """``load_state_dict`` pre-hook of a DETR+ detector: an official
    Co-DETR state dict (keys ``{prefix}query_head.*``) is renamed in place
    into ours (see the module doc); any other is left alone.

    Raises:
        ValueError: naming every official key that has no name of ours.
    """
    names = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    if not is_official_layout(names):
        return
    convert_backbone(module, state_dict, prefix)
    split_head_pos_embed(state_dict, prefix)
    names = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    kinds = branch_kinds(module)
    mapping, unmapped = official_key_map(names, kinds,
                                         set(module.state_dict()))
    if unmapped:
        raise unmapped_error(unmapped, kinds)
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        if key.startswith(prefix):
            key = prefix + mapping[key[len(prefix):]]
        state_dict[key] = value
    renamed = sum(old != new for old, new in mapping.items())
    print_log(
        f'Official Co-DETR checkpoint: {renamed} of {len(mapping)} '
        'keys renamed into the DETR+ layout',
        logger='current')
