"""Train one step of mmdet's ``projects/CO-DETR`` Co-DINO and save its loss
dict and gradients (a subprocess of ``test_co_dino_training_parity.py``).

The reference registers its modules into mmdet's registries with
``force=True`` (and names like ``CoATSSHead`` that DETR+ registers too), so
it must never be imported in the test process: this script runs on its own
(``python tests/co_dino_training_reference.py OUT_DIR``), imports the
reference folder as a package (``co_detr_reference.import_reference``) and
writes ``OUT_DIR/training.pth``: ``state_dict``, the weights it used (the
official layout), and per case of :data:`CASES`:

* ``inputs`` (bs, 3, H, W), ``metas``, ``gt_bboxes``, ``gt_labels``;
* ``losses``: ``CoDETR.loss``'s dict, per-level lists summed;
* ``grads``: per loss group (:func:`loss_group`) the gradient of the
  group's sum w.r.t. each trainable parameter it reaches (official names);
* ``aux_targets``: per auxiliary head, in the official order (RoI heads,
  then one-stage heads), what ``CoDINOHead.get_aux_targets`` returned
  (``coords``: the customized queries' anchors, normalised cxcywh, as the
  decoder gets them; ``labels``, ``bbox_targets``, ``label_weights``,
  ``bbox_weights``).

This module is also imported by the test (for :data:`CASES`,
:func:`controlled_randomness`, ...); it imports no reference code itself.

The model is the official config (``co_detr_reference.CONFIG``, the
schedule without LSJ) made small (:func:`shrink`): a ResNet-18 of base
width 16, 2 encoder and 3 decoder layers, FFN 512, 30 queries, R-CNN box
head FCs of 256; the rest as shipped (5 levels, width 256, 80 classes, 100
denoising queries, every loss and its weight, the samplers).  Its weights
are random: default init, then the transformer's own ``init_weights`` (see
:func:`build_reference`), then every weight perturbed
(``co_detr_reference.perturb``).

Randomness (:func:`controlled_randomness`, used by both sides):

* denoising: both sides draw their noise in mmdet's
  ``CdnQueryGenerator.__call__``; the global generator is seeded with
  :data:`DN_SEED` on entering it, so both draw the same flipped labels and
  noised boxes whatever ran before;
* every other random draw on the training path is a ``torch.randperm(n)``:
  mmdet's ``RandomSampler`` (RPN anchors, RoIs), the official
  ``get_aux_targets`` (the positives kept beyond ``max_pos_coords``, the
  negatives that pad them) and ours (``CollaborativeBranch._choose``).  It
  becomes :func:`rotation`: ``arange(n)`` rotated by an offset that depends
  on ``n`` alone, so both sides take the same positions of the same
  candidates.  A window of consecutive positions rather than a seeded
  random permutation: the RoI sampler's candidates are the RPN proposals
  sorted by score, and two proposals one float32 ulp apart (observed:
  0.623468578 and 0.623468518) can come out swapped on the other side
  (its encoder output differs by ~1e-6); a random subset would then take a
  different box (it did: one RoI of 1024, R-CNN loss_cls off by 3e-5), a
  window only where such a pair straddles one of its two ends.

The official ``get_aux_targets`` moves its permutations to the GPU
(``randperm(...).cuda()``): without one, ``Tensor.cuda`` returns the
tensor (in this script only).
"""
import argparse
import contextlib
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import co_detr_reference as inference  # noqa: E402

NUM_CLASSES = 80
NUM_QUERIES = 30
ENC_LAYERS, DEC_LAYERS, FFN = 2, 3, 512
BACKBONE_WIDTH = 16  # ResNet-18 base_channels
BACKBONE_CHANNELS = [16, 32, 64, 128]
ROI_FC = 256
DN_SEED = 7
#: per case: (h, w) of each image (a batch is padded to its largest),
#: boxes per image and the most positive queries per image (official
#: ``max_pos_coords``, ours ``max_queries``).  ``padded``: the second image
#: is smaller, some anchors chosen as ATSS queries lie outside it (normalised
#: coordinates > 1); ``few_queries``: more positives than ``max_pos``.
CASES = dict(
    padded=dict(shapes=((128, 160), (96, 128)), num_gts=(3, 2), max_pos=300),
    few_queries=dict(
        shapes=((128, 160), (128, 160)), num_gts=(4, 1), max_pos=12))
#: loss groups, each differentiated on its own
GROUPS = ('detr', 'rpn', 'roi', 'atss', 'rcnn_queries', 'atss_queries')


def loss_group(key):
    """The group of an official loss key (None: not a loss).

    ``detr``: the query head's decoder, encoder and denoising terms;
    ``rpn``, ``roi`` (R-CNN box head), ``atss``: the auxiliary heads';
    ``rcnn_queries``, ``atss_queries``: the customized positive queries'
    (``*_aux0``, ``*_aux1``).
    """
    if 'loss' not in key:
        return None
    if key.endswith(('_aux0', '_aux1')):
        return ('rcnn_queries', 'atss_queries')[int(key[-1])]
    if key.startswith('loss_rpn_'):
        return 'rpn'
    if key in ('loss_cls0', 'loss_bbox0'):
        return 'roi'
    if key in ('loss_cls1', 'loss_bbox1', 'loss_centerness1'):
        return 'atss'
    return 'detr'


def shrink(model_cfg):
    """The official model config at the test's sizes (in place)."""
    model_cfg.backbone.update(
        depth=18, base_channels=BACKBONE_WIDTH, init_cfg=None)
    model_cfg.neck.in_channels = BACKBONE_CHANNELS
    model_cfg.roi_head[0].bbox_head.fc_out_channels = ROI_FC
    head = model_cfg.query_head
    head.num_query = NUM_QUERIES
    transformer = head.transformer
    transformer.encoder.num_layers = ENC_LAYERS
    transformer.encoder.with_cp = -1
    transformer.decoder.num_layers = DEC_LAYERS
    for part in (transformer.encoder, transformer.decoder):
        part.transformerlayers.feedforward_channels = FFN
    return model_cfg


def rotation(n, *args, generator=None, device=None, **kwargs):
    """``torch.randperm``'s stand-in: ``arange(n)`` rotated by an offset
    that depends on ``n`` alone (``generator`` is ignored)."""
    gen = torch.Generator().manual_seed(1000 + int(n))
    offset = int(torch.randint(max(int(n), 1), (1, ), generator=gen))
    perm = torch.arange(n, **kwargs).roll(-offset)
    return perm if device is None else perm.to(device)


@contextlib.contextmanager
def controlled_randomness():
    """Seeded denoising noise and :func:`rotation` for ``randperm`` (see
    the module doc); the global generator's state is restored after."""
    from mmdet.models.layers import CdnQueryGenerator
    call, randperm = CdnQueryGenerator.__call__, torch.randperm
    state = torch.get_rng_state()

    def seeded_call(self, *args, **kwargs):
        torch.manual_seed(DN_SEED)
        return call(self, *args, **kwargs)

    CdnQueryGenerator.__call__ = seeded_call
    torch.randperm = rotation
    try:
        yield
    finally:
        CdnQueryGenerator.__call__ = call
        torch.randperm = randperm
        torch.set_rng_state(state)


def make_batch(shapes, num_gts, seed=0):
    """Normalised images zero-padded to the batch shape, their metas and
    ground truth (random boxes inside each image, random labels)."""
    gen = torch.Generator().manual_seed(seed)
    pad_h, pad_w = (max(s[i] for s in shapes) for i in (0, 1))
    inputs = torch.zeros(len(shapes), 3, pad_h, pad_w)
    metas, bboxes, labels = [], [], []
    for i, ((h, w), n) in enumerate(zip(shapes, num_gts)):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        metas.append(
            dict(
                img_shape=(h, w),
                ori_shape=(h, w),
                pad_shape=(pad_h, pad_w),
                batch_input_shape=(pad_h, pad_w),
                scale_factor=(1.0, 1.0)))
        centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=gen) * 0.5 + 0.1
        xyxy = torch.cat([centre - size / 2, centre + size / 2], 1)
        bboxes.append(xyxy.clamp(0, 1) * torch.tensor([w, h, w, h]))
        labels.append(torch.randint(NUM_CLASSES, (n, ), generator=gen))
    return dict(inputs=inputs, metas=metas, gt_bboxes=bboxes, gt_labels=labels)


def data_samples(batch):
    """``DetDataSample``s of a :func:`make_batch` batch (fresh copies)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = []
    for meta, bboxes, labels in zip(batch['metas'], batch['gt_bboxes'],
                                    batch['gt_labels']):
        sample = DetDataSample(metainfo=dict(meta))
        sample.gt_instances = InstanceData(
            bboxes=bboxes.clone(), labels=labels.clone())
        samples.append(sample)
    return samples


def summed(losses):
    """Per-level lists summed (as mmengine's ``parse_losses``)."""
    return {
        k: sum(v) if isinstance(v, (list, tuple)) else v
        for k, v in losses.items()
    }


def group_gradients(losses, group_of, named_parameters):
    """Per group: {name: gradient of the group's summed terms} over the
    trainable parameters it reaches.

    Args:
        losses (dict): loss terms (scalars).
        group_of (callable): loss key -> group name or None.
        named_parameters (iterable): (name, parameter).
    """
    params = [(n, p) for n, p in named_parameters if p.requires_grad]
    totals = {}
    for key, value in losses.items():
        group = group_of(key)
        if group is not None:
            totals[group] = totals.get(group, 0) + value
    grads = {}
    for group, value in totals.items():
        found = torch.autograd.grad(
            value, [p for _, p in params],
            retain_graph=True,
            allow_unused=True)
        grads[group] = {
            name: g
            for (name, _), g in zip(params, found) if g is not None
        }
    return grads


def build_reference(folder):
    """The small official Co-DINO (:func:`shrink`), random weights."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    register_all_modules(init_default_scope=True)
    inference.import_reference(folder)
    MMLogger.get_current_instance().setLevel('WARNING')
    cfg = Config.fromfile(
        osp.join(folder, inference.CONFIG), import_custom_modules=False)
    torch.manual_seed(0)
    model = MODELS.build(shrink(cfg.model))
    model.init_weights()
    # mmdet's DeformableDETRHead.init_weights, which CoDINOHead keeps,
    # does not reach its transformer: level_embeds would stay
    # torch.Tensor's uninitialised memory (it changes from run to run,
    # seen up to 1e36)
    model.query_head.transformer.init_weights()
    inference.perturb(model)
    return model.train()


def record_aux_targets(model):
    """Keep what each ``query_head.get_aux_targets`` call returns."""
    head, found = model.query_head, []
    original = head.get_aux_targets

    def get_aux_targets(*args, **kwargs):
        targets = original(*args, **kwargs)
        found.append(
            dict(
                zip(('coords', 'labels', 'bbox_targets', 'label_weights',
                     'bbox_weights'), (t.detach().clone() for t in targets))))
        return targets

    head.get_aux_targets = get_aux_targets
    return found


@contextlib.contextmanager
def anchors_as_ours(model):
    """DETR+'s documented deviation, applied to the reference: the
    customized queries' first reference boxes are the anchors through
    ``inverse_sigmoid`` and back (clamped to the image, [eps, 1 - eps]), as
    our query sets keep references as logits; the official
    ``forward_aux`` takes the raw anchor (transformer.py:1268), which
    leaves [0, 1] for the smaller image of a padded batch."""
    from mmdet.models.layers.transformer import inverse_sigmoid
    with clamped_anchors(model.query_head.transformer, inverse_sigmoid):
        yield


@contextlib.contextmanager
def clamped_anchors(transformer, inverse_sigmoid):
    """``transformer.forward_aux`` (an official Co-DETR transformer) given
    ``inverse_sigmoid(pos_anchors).sigmoid()`` for its ``pos_anchors``."""
    original = transformer.forward_aux

    def forward_aux(feats, masks, query, pos_embeds, pos_anchors, *args,
                    **kwargs):
        return original(feats, masks, query, pos_embeds,
                        inverse_sigmoid(pos_anchors).sigmoid(), *args,
                        **kwargs)

    transformer.forward_aux = forward_aux
    try:
        yield
    finally:
        del transformer.forward_aux


def train_step(model, batch):
    aux_targets = record_aux_targets(model)
    try:
        with controlled_randomness():
            losses = summed(model.loss(batch['inputs'], data_samples(batch)))
    finally:
        del model.query_head.get_aux_targets
    grads = group_gradients(losses, loss_group, model.named_parameters())
    return dict(
        losses={
            k: v.detach()
            for k, v in losses.items()
        },
        grads=grads,
        aux_targets=aux_targets)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='folder to write training.pth to')
    parser.add_argument('--reference', default=inference.reference_dir())
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not torch.cuda.is_available():  # get_aux_targets' .cuda()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    model = build_reference(args.reference)
    outputs = dict(state_dict=model.state_dict())
    for name, case in CASES.items():
        model.query_head.max_pos_coords = case['max_pos']
        batch = make_batch(case['shapes'], case['num_gts'])
        with anchors_as_ours(model):
            outputs[name] = dict(batch, **train_step(model, batch))
        # the authors' own anchors: the size of the deviation
        outputs[name]['losses_raw_anchors'] = train_step(model,
                                                         batch)['losses']
    torch.save(outputs, osp.join(args.out_dir, 'training.pth'))


if __name__ == '__main__':
    main()
