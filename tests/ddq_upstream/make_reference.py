"""Run the authors' DDQ FCN and DDQ R-CNN and write reference numbers.

Usage::

    python tests/ddq_upstream/make_reference.py /path/to/DDQ [--commit SHA]

``/path/to/DDQ`` is a checkout of ``jshilong/DDQ`` made *outside* this
repository (the code has no licence: it is run, never copied), e.g.::

    mkdir -p /work/ddq_upstream/<SHA> && cd /work/ddq_upstream/<SHA>
    git --git-dir=<bare clone of jshilong/DDQ> archive <SHA> | tar -x

The commit is ``--commit`` or the folder's name.  The script writes
``ddq_fcn.json`` / ``ddq_fcn.pt`` and ``ddq_rcnn.json`` / ``ddq_rcnn.pt``
next to itself: numbers only (losses, assignments, distinct-query ids,
proposals, predictions, gradient projections, the dense maps), plus the
repository, commit, command and the sha256 of every upstream file that ran.

How the authors' code runs here (mmcv 1.x / mmdet 2.x code on a machine
with mmcv 2.1 / torch 2):

* ``sys.path`` starts with ``<DDQ>/mmcv-1.4.7`` and ``<DDQ>``, so ``mmcv``
  is the mmcv 1.4.7 Python package and ``mmdet`` the mmdet 2.22.0 the
  repository bundles (identical to PyPI's mmdet 2.22.0 wheel), and
  ``projects.models`` the DDQ heads, all unmodified;
* the one compiled piece, ``mmcv._ext``, is the installed mmcv 2.1's
  extension (same pybind names and arguments for the ops that run here:
  ``nms``, ``roi_align_forward`` / ``backward``); names it lacks are stubs
  that raise;
* ``torchvision`` (imported by ``mmcv.runner.checkpoint``, unused) is
  ``tests/reference_stubs.torchvision_stubs``;
* ``Tensor.cuda`` is the identity while the forward passes run
  (``DDQFCNHead.forward_train`` calls ``.cuda()`` on its proposal count);
* spies (wrappers that call the original and record what it returns) on
  the heads' methods record the intermediate values.

The weights are :func:`common.weight_for` of each parameter's name in our
model (:func:`common.our_key`), the inputs :func:`common.images` and
:func:`common.ground_truth`.  fp32, CPU, one thread.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import os.path as osp
import re
import sys
import types

import torch

HERE = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, osp.dirname(HERE))  # tests/: reference_stubs

import common  # noqa: E402

from reference_stubs import torchvision_stubs  # noqa: E402

REPOSITORY = 'https://github.com/jshilong/DDQ'
UPSTREAM_FILES = ('projects/models/ddq_fcn_head.py',
                  'projects/models/ddq_fcn_rpn.py',
                  'projects/models/ddq_rcnn.py',
                  'projects/models/loss_module.py', 'projects/models/utils.py',
                  'projects/configs/ddq_fcn/ddq_fcn_r50_1x.py',
                  'projects/configs/ddq_rcnn/ddq_rcnn_r50_1x.py',
                  'mmdet/models/dense_heads/anchor_free_head.py',
                  'mmdet/models/roi_heads/sparse_roi_head.py',
                  'mmdet/models/roi_heads/bbox_heads/dii_head.py',
                  'mmdet/core/bbox/assigners/hungarian_assigner.py',
                  'mmdet/models/losses/gfocal_loss.py',
                  'mmcv-1.4.7/mmcv/ops/nms.py')
SHIMS = ('mmcv._ext: the installed mmcv 2.1 extension (nms, roi_align)',
         'torchvision: tests/reference_stubs.torchvision_stubs (unused)',
         'torch.Tensor.cuda: the identity during the forward passes')


# ----------------------------------------------------------------------
# loading the authors' code
# ----------------------------------------------------------------------
class _Extension(types.ModuleType):
    """mmcv 2.1's compiled ops under mmcv 1.4.7's name; the ops 1.4.7
    lists but 2.1 lacks raise when called."""

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise NotImplementedError(f'mmcv._ext.{name} (not in mmcv 2.1)')

        return missing


def _installed_extension():
    """The installed mmcv's compiled ``_ext`` (found, not imported)."""
    spec = importlib.util.find_spec('mmcv')
    folder = spec.submodule_search_locations[0]
    name = [f for f in os.listdir(folder) if re.match(r'_ext\..*so$', f)][0]
    ext_spec = importlib.util.spec_from_file_location('mmcv._ext',
                                                      osp.join(folder, name))
    ext = importlib.util.module_from_spec(ext_spec)
    ext_spec.loader.exec_module(ext)
    proxy = _Extension('mmcv._ext')
    proxy.__dict__.update(
        {k: getattr(ext, k)
         for k in dir(ext) if not k.startswith('__')})
    return proxy


def load_upstream(root):
    """Import the bundled mmcv 1.4.7, mmdet 2.22 and ``projects.models``
    of the DDQ checkout ``root``; returns the modules used."""
    if 'mmcv' in sys.modules or 'mmdet' in sys.modules:
        raise RuntimeError('run this script in a fresh process')
    ext = _installed_extension()
    sys.path[:0] = [osp.join(root, 'mmcv-1.4.7'), root]
    sys.modules['mmcv._ext'] = ext
    sys.modules.update(torchvision_stubs())
    import mmcv
    import mmdet
    import mmdet.models
    import projects.models
    assert mmcv.__file__.startswith(root) and mmdet.__file__.startswith(root)
    from projects.models import ddq_fcn_head, ddq_fcn_rpn
    return types.SimpleNamespace(
        mmcv=mmcv,
        mmdet=mmdet,
        models=mmdet.models,
        ddq_fcn_head=ddq_fcn_head,
        ddq_fcn_rpn=ddq_fcn_rpn,
        projects=projects.models)


# ----------------------------------------------------------------------
# the models: the shapes configs of this repository in mmdet 2 terms
# ----------------------------------------------------------------------
def _backbone(out_indices):
    return dict(
        type='ResNet',
        depth=18,
        base_channels=32,
        num_stages=4,
        out_indices=out_indices,
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None)


def _ddq_head(head_type, num_distinct_queries):
    """``DDQFCNHead`` / ``DDQFCNRPN`` as the released configs, at the shapes
    width (128 channels, 32 shuffled, 6 classes)."""
    return dict(
        type=head_type,
        num_classes=common.NUM_CLASSES,
        in_channels=128,
        feat_channels=128,
        shuffle_channles=32,  # sic, the upstream argument name
        strides=(8, 16, 32, 64, 128),
        dqs_cfg=dict(type='nms', iou_threshold=0.7, nms_pre=1000),
        num_distinct_queries=num_distinct_queries,
        norm_cfg=dict(type='GN', num_groups=32, requires_grad=True))


def fcn_config():
    """``projects/configs/ddq_fcn/ddq_fcn_r50_1x.py``'s model with
    ``configs/shapes/ddq-fcn-tiny_shapes.py``'s sizes.  The neck is a dict
    (ours), not the official one-element list: the same FPN, named
    ``neck.*`` instead of ``neck.0.*``."""
    return dict(
        type='SingleStageDetector',
        backbone=_backbone((1, 2, 3)),
        neck=dict(
            type='FPN',
            in_channels=[64, 128, 256],
            out_channels=128,
            start_level=0,
            add_extra_convs='on_input',
            num_outs=5),
        bbox_head=_ddq_head('DDQFCNHead', 100),
        train_cfg=None,
        test_cfg=None)


def _dii_head():
    return dict(
        type='DIIHead',
        num_classes=common.NUM_CLASSES,
        num_ffn_fcs=2,
        num_heads=8,
        num_cls_fcs=1,
        num_reg_fcs=3,
        feedforward_channels=512,
        in_channels=128,
        dropout=0.0,
        ffn_act_cfg=dict(type='ReLU', inplace=True),
        dynamic_conv_cfg=dict(
            type='DynamicConv',
            in_channels=128,
            feat_channels=32,
            out_channels=128,
            input_feat_shape=7,
            act_cfg=dict(type='ReLU', inplace=True),
            norm_cfg=dict(type='LN')),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=2.0),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder',
            clip_border=False,
            target_means=[0., 0., 0., 0.],
            target_stds=[0.5, 0.5, 1., 1.]))


def rcnn_config():
    """``projects/configs/ddq_rcnn/ddq_rcnn_r50_1x.py``'s model with
    ``configs/shapes/ddq-rcnn-tiny_shapes.py``'s sizes."""
    assigner = dict(
        type='HungarianAssigner',
        cls_cost=dict(type='FocalLossCost', weight=2.0),
        reg_cost=dict(type='BBoxL1Cost', weight=5.0),
        iou_cost=dict(type='IoUCost', iou_mode='giou', weight=2.0))
    return dict(
        type='DDQRCNN',
        backbone=_backbone((0, 1, 2, 3)),
        neck=dict(
            type='FPN',
            in_channels=[32, 64, 128, 256],
            out_channels=128,
            start_level=0,
            add_extra_convs='on_input',
            num_outs=6),
        # 300: ``DDQFCNRPN`` sets its ``num_distinct_queries``, then
        # ``DDQFCNHead.__init__`` resets it to its own default, 300
        rpn_head=_ddq_head('DDQFCNRPN', 300),
        roi_head=dict(
            type='SparseRoIHead',
            num_stages=2,
            stage_loss_weights=[1, 1],
            proposal_feature_channel=128,
            bbox_roi_extractor=dict(
                type='SingleRoIExtractor',
                roi_layer=dict(
                    type='RoIAlign', output_size=7, sampling_ratio=2),
                out_channels=128,
                featmap_strides=[4, 8, 16, 32, 64, 128]),
            bbox_head=[_dii_head(), _dii_head()]),
        train_cfg=dict(
            rpn=None,
            rcnn=[
                dict(
                    assigner=assigner,
                    sampler=dict(type='PseudoSampler'),
                    pos_weight=1) for _ in range(2)
            ]),
        test_cfg=dict(rpn=dict(), rcnn=dict(max_per_img=100)))


def build(up, cfg):
    """The upstream detector of ``cfg`` with :func:`common.weight_for`
    weights; returns it and the key mapping [(upstream key, our key,
    shape)]."""
    from mmcv import ConfigDict
    model = up.models.build_detector(ConfigDict(cfg))
    state = model.state_dict()
    mapping = [(key, common.our_key(key), list(value.shape))
               for key, value in state.items()]
    # in place: ``load_state_dict`` of a dict without ``_metadata`` would
    # run mmdet's AnchorFreeHead key hack (``aux_conv_cls`` -> ``conv_cls``)
    with torch.no_grad():
        for key, ours, shape in mapping:
            state[key].copy_(common.weight_for(ours, shape))
    return model, mapping


def img_metas():
    """mmdet 2 image metas: (h, w, 3) shapes and a 4-value scale factor."""
    h, w = common.BATCH_HW
    metas = []
    for meta in common.IMAGES:
        sw, sh = meta['scale_factor']
        ih, iw = meta['img_shape']
        metas.append(
            dict(
                img_shape=(ih, iw, 3),
                ori_shape=(round(ih / sh), round(iw / sw), 3),
                pad_shape=(h, w, 3),
                batch_input_shape=(h, w),
                scale_factor=torch.tensor([sw, sh, sw, sh]).numpy(),
                flip=False))
    return metas


# ----------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------
def spy(owner, name, record):
    """Replace ``owner.name`` by a wrapper that calls the original and
    appends its return value to ``record``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        record.append(result)
        return result

    setattr(owner, name, wrapper)


class _NoCuda:
    """``Tensor.cuda`` as the identity (the heads call ``.cuda()`` on a
    logged count; this machine has no GPU)."""

    def __enter__(self):
        self.saved = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *args, **kwargs: self

    def __exit__(self, *exc):
        torch.Tensor.cuda = self.saved


def floats(tensor):
    return [float(v) for v in tensor.detach().flatten()]


def ints(tensor):
    return [int(v) for v in tensor.flatten()]


def loss_values(losses):
    """Every loss term: per-image lists stay lists."""
    out = {}
    for key, value in losses.items():
        if isinstance(value, (list, tuple)):
            out[key] = [float(v) for v in value]
        else:
            out[key] = float(value)
    return out


def total_loss(losses):
    """mmdet 2 ``BaseDetector._parse_losses``: the sum of every term whose
    name holds ``loss`` (lists summed)."""
    total = 0
    for key, value in losses.items():
        if 'loss' not in key:
            continue
        if isinstance(value, (list, tuple)):
            value = sum(v.mean() for v in value)
        total = total + value.mean()
    return total


def gradients(model, mapping):
    """Per parameter (our key): [norm, projection on
    :func:`common.projection_for`] of its gradient, None if it has none."""
    ours = {up_key: our for up_key, our, _ in mapping}
    stats = {}
    for key, param in model.named_parameters():
        if param.grad is None:
            stats[ours[key]] = None
            continue
        grad = param.grad.double()
        direction = common.projection_for(ours[key], grad.shape).double()
        stats[ours[key]] = [
            float(grad.norm()),
            float((grad * direction).sum())
        ]
    return stats


def assignments(record):
    """Per assigner call: positives' indices, gt indices (0-based), IoUs
    and alignment metrics (where the result has them)."""
    out = []
    for result in record:
        pos = (result.gt_inds > 0).nonzero(as_tuple=True)[0]
        item = dict(pos=ints(pos), gt=ints(result.gt_inds[pos] - 1))
        if result.max_overlaps is not None:
            item['iou'] = floats(result.max_overlaps)
        metrics = getattr(result, 'assign_metrics', None)
        if metrics is not None:
            item['metric'] = floats(metrics)
        out.append(item)
    return out


def detections(results):
    """mmdet 2 ``bbox2result`` per image -> rows (label, x1, y1, x2, y2,
    score) by descending score."""
    out = []
    for per_class in results:
        rows = [[label, *map(float, det)]
                for label, dets in enumerate(per_class) for det in dets]
        rows.sort(key=lambda row: -row[-1])
        out.append(rows)
    return out


def inputs(empty_images=()):
    """Images, mmdet 2 metas and ground truth."""
    gts = common.ground_truth(empty_images)
    return (common.images(), img_metas(), [boxes for boxes, _ in gts],
            [labels for _, labels in gts])


def level_maps(results):
    """A head's per-level (B, K, H, W) maps -> (B, K, sum H W)."""
    return torch.cat([m.detach().flatten(2) for m in results], 2)


def train_with_empty_image(model, mapping):
    """Losses, total and gradients of a training step in which image 1
    has no ground truth (``common.EMPTY_IMAGES``)."""
    model.train()
    model.zero_grad()
    img, metas, gt_bboxes, gt_labels = inputs(common.EMPTY_IMAGES)
    with _NoCuda():
        losses = model.forward_train(img, metas, gt_bboxes, gt_labels)
    total = total_loss(losses)
    total.backward()
    return dict(
        losses=loss_values(losses),
        total_loss=float(total),
        gradients=gradients(model, mapping))


def maps_of(head_output, prefix=''):
    """The dense maps of ``DDQFCNHead.forward``'s (main, aux) results."""
    main, aux = head_output
    out = {}
    for name, results in (('', main), ('aux_', aux)):
        if results is None:
            continue
        out[f'{prefix}{name}scores'] = level_maps(results['cls_scores_list'])
        out[f'{prefix}{name}distances'] = level_maps(
            results['bbox_preds_list'])
    return out


def candidates_of(record, prefix=''):
    """``pre_dqs`` calls (main, then aux) -> their boxes (B, n, 4) and
    point ids (B, n)."""
    out = {}
    for name, (_, boxes, ids) in zip(('', 'aux_'), record):
        out[f'{prefix}{name}candidate_boxes'] = torch.stack(boxes).detach()
        out[f'{prefix}{name}candidate_ids'] = torch.stack(ids)
    return out


def run_fcn(up):
    """DDQ FCN: predictions (eval), then one training step's outputs,
    candidates, distinct queries, assignments, losses and gradients."""
    model, mapping = build(up, fcn_config())
    head = model.bbox_head
    img, metas, gt_bboxes, gt_labels = inputs()
    nms_calls = []
    spy(up.ddq_fcn_head, 'batched_nms', nms_calls)
    model.eval()  # first: BN with the generated running statistics
    with torch.no_grad():
        results = model.simple_test(img, metas, rescale=True)
    numbers = dict(
        predict=dict(
            detections=detections(results),
            distinct_counts=[len(keep) for _, keep in nms_calls]))

    model.train()
    nms_calls.clear()
    forward, pre_dqs, main_assign, aux_assign = [], [], [], []
    spy(head, 'forward', forward)
    spy(head, 'pre_dqs', pre_dqs)
    spy(head.main_loss.assigner, 'assign', main_assign)
    spy(head.aux_loss.assigner, 'assign', aux_assign)
    with _NoCuda():
        losses = model.forward_train(img, metas, gt_bboxes, gt_labels)
    total = total_loss(losses)
    total.backward()
    tensors = dict(maps_of(forward[0]), **candidates_of(pre_dqs))
    ids = tensors['candidate_ids']
    numbers['train'] = dict(
        losses=loss_values(losses),
        total_loss=float(total),
        distinct_ids=[
            ints(ids[b, keep]) for b, (_, keep) in enumerate(nms_calls)
        ],
        main_assign=assignments(main_assign),
        aux_assign=assignments(aux_assign),
        gradients=gradients(model, mapping))
    numbers['train_empty_image'] = train_with_empty_image(model, mapping)
    return mapping, numbers, tensors


def run_rcnn(up):
    """DDQ R-CNN: predictions (eval), then one training step (proposal
    stage and the two Sparse R-CNN stages)."""
    model, mapping = build(up, rcnn_config())
    rpn, roi = model.rpn_head, model.roi_head
    img, metas, gt_bboxes, gt_labels = inputs()
    dqs, queries, stages = [], [], []
    spy(rpn, 'dqs', dqs)
    spy(rpn, 'construct_query', queries)
    spy(roi, '_bbox_forward', stages)
    model.eval()
    with torch.no_grad():
        results = model.simple_test(img, metas, rescale=True)
    tensors = _rcnn_tensors('predict_', queries, stages)
    numbers = dict(
        predict=dict(
            detections=detections(results),
            distinct_ids=[ints(ids) for ids in dqs[0][2]]))

    model.train()
    for record in (dqs, queries, stages):
        record.clear()
    forward, pre_dqs, main_assign, aux_assign = [], [], [], []
    roi_assign = [[] for _ in range(roi.num_stages)]
    spy(rpn, 'forward', forward)
    spy(rpn, 'pre_dqs', pre_dqs)
    spy(rpn.main_loss.assigner, 'assign', main_assign)
    spy(rpn.aux_loss.assigner, 'assign', aux_assign)
    for stage, record in enumerate(roi_assign):
        spy(roi.bbox_assigner[stage], 'assign', record)
    with _NoCuda():
        losses = model.forward_train(img, metas, gt_bboxes, gt_labels)
    total = total_loss(losses)
    total.backward()
    tensors.update(maps_of(forward[0]), **candidates_of(pre_dqs))
    tensors.update(_rcnn_tensors('', queries, stages))
    numbers['train'] = dict(
        losses=loss_values(losses),
        total_loss=float(total),
        distinct_ids=[ints(ids) for ids in dqs[0][2]],
        main_assign=assignments(main_assign),
        aux_assign=assignments(aux_assign),
        roi_assign=[assignments(record) for record in roi_assign],
        gradients=gradients(model, mapping))
    numbers['train_empty_image'] = train_with_empty_image(model, mapping)
    return mapping, numbers, tensors


def _rcnn_tensors(prefix, queries, stages):
    """Proposals (B, N, 4), their features (B, N, C) and each stage's
    class logits (B, N, classes) and boxes (B, N, 4)."""
    out = {
        f'{prefix}proposals': queries[0]['proposals'].detach(),
        f'{prefix}object_feats': queries[0]['object_feats'].detach(),
    }
    for stage, result in enumerate(stages):
        out[f'{prefix}stage{stage}_cls_score'] = result['cls_score'].detach()
        out[f'{prefix}stage{stage}_boxes'] = result['decode_bbox_pred'].detach(
        )
    return out


# ----------------------------------------------------------------------
# main
# ----------------------------------------------------------------------
def provenance(root, commit):
    """Repository, commit, command, library versions, upstream file
    hashes."""
    hashes = {}
    for path in UPSTREAM_FILES:
        with open(osp.join(root, path), 'rb') as f:
            hashes[path] = hashlib.sha256(f.read()).hexdigest()
    import mmcv
    import mmdet
    return dict(
        repository=REPOSITORY,
        commit=commit,
        command='python tests/ddq_upstream/make_reference.py '
        f'<checkout of {commit}>',
        upstream_files_sha256=hashes,
        shims=list(SHIMS),
        ran_with=dict(
            torch=torch.__version__,
            mmcv=mmcv.__version__ + ' (bundled, Python; ops of mmcv 2.1)',
            mmdet=mmdet.__version__ + ' (bundled)'),
        inputs=dict(
            images=common.checksum(common.images()),
            ground_truth=[[floats(boxes), ints(labels)]
                          for boxes, labels in common.ground_truth()]))


def official_architecture(up, root, config):
    """[key, shape] of every parameter and buffer of the upstream model of
    the official ``config`` (R50, 80 classes; no pretrained weights)."""
    from mmcv import Config
    cfg = Config.fromfile(osp.join(root, config))
    cfg.model.backbone.init_cfg = None
    model = up.models.build_detector(cfg.model)
    return [[key, list(value.shape)]
            for key, value in model.state_dict().items()]


def write(name, meta, mapping, numbers, tensors):
    weights = {
        ours: common.checksum(common.weight_for(ours, shape))
        for _, ours, shape in mapping
    }
    data = dict(
        meta,
        mapping=mapping,
        weights_checksum=weights,
        tensors=f'{name}.pt',
        **numbers)
    with open(osp.join(HERE, f'{name}.json'), 'w') as f:
        json.dump(data, f, indent=1)
        f.write('\n')
    torch.save({
        k: v.contiguous()
        for k, v in tensors.items()
    }, osp.join(HERE, f'{name}.pt'))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'ddq',
        nargs='?',
        default=os.environ.get('DDQ_UPSTREAM'),
        help='checkout of jshilong/DDQ (default: $DDQ_UPSTREAM)')
    parser.add_argument(
        '--commit', help='its commit (default: the folder name)')
    args = parser.parse_args()
    if not args.ddq:
        parser.error('give the DDQ checkout (or set DDQ_UPSTREAM)')
    args.ddq = osp.abspath(args.ddq)
    args.commit = args.commit or osp.basename(args.ddq.rstrip('/'))
    if not re.fullmatch(r'[0-9a-f]{40}', args.commit):
        parser.error(f'not a commit: {args.commit} (use --commit)')
    return args


def main():
    args = parse_args()
    torch.set_num_threads(1)
    up = load_upstream(args.ddq)
    meta = provenance(args.ddq, args.commit)
    for name, config, run in (('ddq_fcn',
                               'projects/configs/ddq_fcn/ddq_fcn_r50_1x.py',
                               run_fcn),
                              ('ddq_rcnn',
                               'projects/configs/ddq_rcnn/ddq_rcnn_r50_1x.py',
                               run_rcnn)):
        official = dict(
            official_config=config,
            official_architecture=official_architecture(up, args.ddq, config))
        write(name, dict(meta, **official), *run(up))


if __name__ == '__main__':
    main()
