"""Run Sense-X/Co-DETR's Co-Deformable-DETR query head and save what it
computes (a subprocess of ``test_co_deformable_parity.py``).

``python tests/co_deformable_reference.py OUT_DIR`` builds the official
``CoDeformDETRHead`` with its ``CoDeformableDetrTransformer``
(``projects/models/co_deformable_detr_head.py``, ``transformer.py`` of the
copy in ``../shared/reference/sense-x-co-detr``, unmodified) on mmdet
2.28.2's ``DETRHead``, ``DeformableDetrTransformer``, Hungarian assigner
and losses (:mod:`mmdet2_loader`; it takes the name ``mmdet``, hence a
process of its own), from the official R50 config
(``co_deformable_detr_r50_1x_coco.py``: its ``query_head``,
``train_cfg[0]``, ``test_cfg[0]``) made small (:data:`SMALL`).  Random
weights: the head's ``init_weights`` (as ``CoDETR.__init__`` calls it),
then every weight perturbed (``co_detr_reference.perturb``).

What is compared is the query head, fed by :func:`make_case`: the
backbone + neck output (4 random levels), the images' metas and ground
truth, and the auxiliary heads' candidates (the ``pos_coords`` that
``CoStandardRoIHead`` and ``CoATSSHead`` hand to ``forward_train_aux``:
random boxes, labels and R-CNN features; ATSS's anchors on every location
of the encoder pyramid).  The auxiliary heads themselves are Co-DINO's,
compared with mmdet's port in ``test_co_dino_training_parity.py``.  The
detector's ``forward_train`` is followed: ``query_head.forward_train``,
then ``forward_train_aux`` per auxiliary head (index 0 the R-CNN's, 1
ATSS's) on the encoder pyramid it returned, keys suffixed by the index
(``upd_loss``).  Written to ``OUT_DIR/co_deformable.pth``:

* ``state_dict``: the head's weights, official names (``query_head.``);
* per case (:data:`CASES`): the inputs (``feats``, ``metas``,
  ``gt_bboxes``, ``gt_labels``, ``pos_coords``), ``pyramid`` (the encoder
  output per level and the stride-2 level on top), ``losses`` (the loss
  dict), ``grads`` per loss group (:func:`loss_group`), ``aux_targets``
  (what ``get_aux_targets`` returned per head) and ``predictions``
  (``simple_test_bboxes``, eval mode: per image (n, 5) boxes + score and
  labels), and ``losses_raw_anchors``: the loss dict with the official
  anchors (all else above with DETR+'s clamped ones, :func:`anchors_as_ours`).

Random draws (``get_aux_targets``' ``randperm``, moved to the GPU with
``.cuda()``) are ``co_dino_training_reference.rotation`` (:func:`rotations`).
"""
import argparse
import contextlib
import importlib.util
import os.path as osp
import runpy
import sys
import tempfile

import torch

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import co_detr_reference  # noqa: E402
import co_dino_training_reference as training  # noqa: E402
import mmdet2_loader  # noqa: E402

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
REFERENCE_PLACES = tuple(
    osp.join(root, 'shared/reference/sense-x-co-detr')
    for root in (REPO_ROOT, osp.dirname(REPO_ROOT)))
CONFIG = ('projects/configs/co_deformable_detr/'
          'co_deformable_detr_r50_1x_coco.py')
NUM_CLASSES = 80
#: the official head at the test's sizes
SMALL = dict(
    num_query=30, enc_layers=2, dec_layers=3, ffn=512, max_pos_coords=300)
STRIDES = (8, 16, 32, 64)
DIMS = 256
#: per case: image (h, w) (a batch is padded to its largest), boxes per
#: image, positives per image of the R-CNN and ATSS candidates, R-CNN
#: candidates per image, and ``max_pos_coords``
CASES = dict(
    padded=dict(
        shapes=((128, 160), (96, 128)),
        num_gts=(3, 2),
        positives=((5, 2), (7, 0)),
        rois=40,
        max_pos=300),
    few_queries=dict(
        shapes=((128, 160), (128, 160)),
        num_gts=(4, 1),
        positives=((14, 3), (20, 12)),
        rois=40,
        max_pos=10))
GROUPS = ('detr', 'rcnn_queries', 'atss_queries')


def reference_dir():
    """``$SENSE_X_CO_DETR``, else the first of :data:`REFERENCE_PLACES`
    that exists (else the last, missing)."""
    import os
    if 'SENSE_X_CO_DETR' in os.environ:
        return os.environ['SENSE_X_CO_DETR']
    found = [p for p in REFERENCE_PLACES if osp.isdir(p)]
    return (found or REFERENCE_PLACES[-1:])[0]


def loss_group(key):
    """``detr`` (the one-to-one queries, encoder proposals), or the
    customized queries of aux head 0 (R-CNN) / 1 (ATSS)."""
    if 'loss' not in key:
        return None
    if key.endswith(('_aux0', '_aux1')):
        return GROUPS[1 + int(key[-1])]
    return 'detr'


def head_config(folder):
    """The official ``query_head`` with ``train_cfg[0]``, ``test_cfg[0]``,
    made small."""
    cfg = runpy.run_path(osp.join(folder, CONFIG))['model']
    head = dict(
        cfg['query_head'],
        train_cfg=cfg['train_cfg'][0],
        test_cfg=cfg['test_cfg'][0],
        num_query=SMALL['num_query'],
        max_pos_coords=SMALL['max_pos_coords'])
    transformer = head['transformer']
    transformer['encoder']['num_layers'] = SMALL['enc_layers']
    transformer['decoder']['num_layers'] = SMALL['dec_layers']
    for part in (transformer['encoder'], transformer['decoder']):
        part['transformerlayers']['feedforward_channels'] = SMALL['ffn']
    return head


def import_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_head(folder, wheel):
    """The official head, random weights (init_weights, then perturbed)."""
    models = mmdet2_loader.load(wheel, tempfile.mkdtemp(prefix='mmdet2_'))
    for name in ('transformer', 'co_deformable_detr_head'):
        import_file(f'sense_x_{name}',
                    osp.join(folder, 'projects/models', f'{name}.py'))
    torch.manual_seed(0)
    head = models.build(head_config(folder))
    head.init_weights()
    co_detr_reference.perturb(head)
    return head


def _anchors(sizes, shape):
    """ATSS's anchors (xyxy, one per location, level by level, row-major):
    ``octave_base_scale`` 8 times the stride, centred on the location's
    corner (mmdet's ``AnchorGenerator``, ``center_offset`` 0)."""
    out = []
    for (h, w), stride in zip(sizes, (*STRIDES, STRIDES[-1] * 2)):
        ys, xs = torch.meshgrid(
            torch.arange(h) * stride, torch.arange(w) * stride, indexing='ij')
        centres = torch.stack([xs, ys], -1).reshape(-1, 2).float()
        half = 4.0 * stride
        out.append(torch.cat([centres - half, centres + half], 1))
    return torch.cat(out)


def _candidates(gen, coords, gt_boxes, gt_labels, positives):
    """Labels (background 80) and targets of ``coords``: ``positives``
    of them (random) take a random ground-truth box; negatives target their
    own box."""
    n = len(coords)
    labels = torch.full((n, ), NUM_CLASSES, dtype=torch.long)
    targets = coords.clone()
    chosen = torch.randperm(n, generator=gen)[:positives]
    which = torch.randint(len(gt_boxes), (positives, ), generator=gen)
    labels[chosen] = gt_labels[which]
    targets[chosen] = gt_boxes[which]
    return labels, targets


def _random_boxes(gen, n, h, w):
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.5 + 0.1
    xyxy = torch.cat([centre - size / 2, centre + size / 2], 1)
    return xyxy.clamp(0, 1) * torch.tensor([w, h, w, h])


def make_case(case, seed=0):
    """Inputs of one case: neck features, metas, ground truth and the
    auxiliary heads' candidates (RoI features drawn here)."""
    batch = training.make_batch(case['shapes'], case['num_gts'], seed)
    gen = torch.Generator().manual_seed(seed + 1)
    bs = len(case['shapes'])
    pad_h, pad_w = batch['metas'][0]['batch_input_shape']
    sizes = [(-(-pad_h // s), -(-pad_w // s)) for s in STRIDES]
    feats = [torch.randn(bs, DIMS, h, w, generator=gen) for h, w in sizes]
    sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    anchors = _anchors(sizes, (pad_h, pad_w))
    rcnn, atss = [], []
    for i, (h, w) in enumerate(case['shapes']):
        gt_boxes, gt_labels = batch['gt_bboxes'][i], batch['gt_labels'][i]
        n_rcnn, n_atss = case['positives'][i]
        rois = _random_boxes(gen, case['rois'], h, w)
        labels, targets = _candidates(gen, rois, gt_boxes, gt_labels, n_rcnn)
        rcnn.append((rois, labels, targets,
                     torch.randn(case['rois'], DIMS, generator=gen)))
        labels, targets = _candidates(gen, anchors, gt_boxes, gt_labels,
                                      n_atss)
        atss.append((anchors, labels, targets))
    pos_coords = [
        tuple([list(x) for x in zip(*rcnn)]) + ('rcnn', ),
        tuple([list(x) for x in zip(*atss)]) + ('atss', )
    ]
    return dict(batch, feats=feats, pos_coords=pos_coords)


def metas_of(case_inputs):
    """The official img_metas: ``img_shape`` (h, w, 3)."""
    return [
        dict(m, img_shape=(*m['img_shape'], 3)) for m in case_inputs['metas']
    ]


def record_aux_targets(head):
    found, original = [], head.get_aux_targets

    def get_aux_targets(*args, **kwargs):
        targets = original(*args, **kwargs)
        found.append(
            dict(
                zip(('coords', 'labels', 'bbox_targets', 'label_weights',
                     'bbox_weights', 'feats'),
                    (t.detach().clone() for t in targets[:6]))))
        return targets

    head.get_aux_targets = get_aux_targets
    return found


@contextlib.contextmanager
def rotations():
    """``torch.randperm`` -> ``co_dino_training_reference.rotation`` (no
    denoising here: the rest of ``controlled_randomness`` is mmdet 3's)."""
    randperm, torch.randperm = torch.randperm, training.rotation
    try:
        yield
    finally:
        torch.randperm = randperm


@contextlib.contextmanager
def anchors_as_ours(head):
    """DETR+'s documented deviation (as in
    ``co_dino_training_reference.anchors_as_ours``): the customized
    queries' first reference boxes through ``inverse_sigmoid`` and back,
    i.e. clamped to [eps, 1 - eps]; the official ``forward_aux`` takes the
    raw anchors, larger than the image for the largest ATSS anchors."""
    from mmdet.models.utils.transformer import inverse_sigmoid
    with training.clamped_anchors(head.transformer, inverse_sigmoid):
        yield


def train_step(head, inputs):
    """``CoDETR.forward_train``'s query-head part."""
    metas = metas_of(inputs)
    aux_targets = record_aux_targets(head)
    try:
        with rotations():
            losses, pyramid = head.forward_train(inputs['feats'], metas,
                                                 inputs['gt_bboxes'],
                                                 inputs['gt_labels'])
            for index, pos_coords in enumerate(inputs['pos_coords']):
                aux = head.forward_train_aux(pyramid, metas,
                                             inputs['gt_bboxes'],
                                             inputs['gt_labels'], None,
                                             pos_coords, index)
                losses.update({f'{k}{index}': v for k, v in aux.items()})
    finally:
        del head.get_aux_targets
    grads = training.group_gradients(losses, loss_group,
                                     head.named_parameters())
    return dict(
        losses={
            k: v.detach()
            for k, v in losses.items()
        },
        grads=grads,
        aux_targets=aux_targets,
        pyramid=[level.detach() for level in pyramid])


def predict(head, inputs):
    head.eval()
    try:
        with torch.no_grad():
            results = head.simple_test_bboxes(inputs['feats'],
                                              metas_of(inputs))
    finally:
        head.train()
    return [(boxes, labels) for boxes, labels in results]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='folder to write the results to')
    parser.add_argument('--reference', default=reference_dir())
    parser.add_argument('--wheel', default=mmdet2_loader.find_wheel())
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not torch.cuda.is_available():  # get_aux_targets' .cuda()
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    head = build_head(args.reference, args.wheel).train()
    outputs = dict(state_dict={
        f'query_head.{k}': v
        for k, v in head.state_dict().items()
    })
    for name, case in CASES.items():
        head.max_pos_coords = case['max_pos']
        inputs = make_case(case)
        with anchors_as_ours(head):
            outputs[name] = dict(inputs, **train_step(head, inputs))
        outputs[name]['predictions'] = predict(head, inputs)
        # the authors' own anchors: the size of the deviation
        outputs[name]['losses_raw_anchors'] = train_step(head,
                                                         inputs)['losses']
    torch.save(outputs, osp.join(args.out_dir, 'co_deformable.pth'))


if __name__ == '__main__':
    main()
