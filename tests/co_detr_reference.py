"""Build mmdet's ``projects/CO-DETR`` Co-DINO and save its weights and
predictions (a subprocess of ``test_co_detr_parity.py``).

The reference registers its modules into mmdet's registries with
``force=True`` (and names like ``CoATSSHead`` that DETR+ registers too), so
it must never be imported in the test process: this script runs on its own
(``python tests/co_detr_reference.py OUT_DIR``), imports the reference
folder as a package ``codetr_ref`` from a temporary directory and writes
into ``OUT_DIR``:

* ``co_dino_official.pth``: the checkpoint, ``dict(state_dict=..., meta=...)``
  in the official key layout;
* ``reference.pth``: per batch (:data:`BATCHES`) its ``inputs`` (bs, 3, H,
  W) (normalised, zero padding), ``metas`` and ``predictions`` per test-time
  NMS (:data:`NMS`), each a list per image of dicts of ``bboxes`` (n, 4),
  ``scores`` (n, ) and ``labels`` (n, ); for the padded batch also
  ``codetr_predict``: the NMS-free predictions of the whole
  ``CoDETR.predict`` with ``use_lsj=True`` (the test checks they are the
  ``predictions``: ``use_lsj`` does nothing in mmdet's port, see
  :func:`predict_lsj`); and ``aux_content``: the content of the customized
  positive queries on ``aux_anchors`` per official aux head index
  (:func:`aux_content`).

The model is the official R50 Co-DINO-5scale (900 queries, 80 classes) with
random weights: default init, then every weight perturbed by a seeded
normal, so that no two parameters of a kind are equal (a swapped key changes
the predictions) and class scores are not tied.
"""
import argparse
import os
import os.path as osp
import sys
import tempfile

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: where the copy is looked for, first found (``$CO_DETR_REFERENCE`` first)
REFERENCE_PLACES = tuple(
    osp.join(root, 'shared/reference/mmdet-projects-co-detr')
    for root in (REPO_ROOT, osp.dirname(REPO_ROOT)))
CONFIG = 'configs/codino/co_dino_5scale_r50_8xb2_1x_coco.py'
#: (h, w) of each image per batch; a batch is padded to its largest
BATCHES = dict(padded=((128, 160), (96, 128)), unpadded=((128, 160), ))
NMS = dict(none=None, soft_nms=dict(type='soft_nms', iou_threshold=0.8))
#: resize factor from the original images (predictions are rescaled)
SCALE = 0.8


def reference_dir():
    """The reference folder: ``$CO_DETR_REFERENCE``, else the first of
    :data:`REFERENCE_PLACES` that exists (else the last, missing)."""
    if 'CO_DETR_REFERENCE' in os.environ:
        return os.environ['CO_DETR_REFERENCE']
    found = [p for p in REFERENCE_PLACES if osp.isdir(p)]
    return (found or REFERENCE_PLACES[-1:])[0]


def import_reference(folder):
    """Import ``folder/codetr`` as the package ``codetr_ref``."""
    tmp = tempfile.mkdtemp(prefix='codetr_ref_')
    os.symlink(osp.join(folder, 'codetr'), osp.join(tmp, 'codetr_ref'))
    sys.path.insert(0, tmp)
    import codetr_ref  # noqa: F401


def build_reference(folder):
    """The official config, random init, no pretrained backbone, no
    fairscale checkpointing."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    register_all_modules(init_default_scope=True)
    import_reference(folder)
    MMLogger.get_current_instance().setLevel('WARNING')
    cfg = Config.fromfile(
        osp.join(folder, CONFIG), import_custom_modules=False)
    cfg.model.backbone.init_cfg = None
    cfg.model.query_head.transformer.encoder.with_cp = -1
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    # mmdet's DeformableDETRHead.init_weights, which CoDINOHead keeps, does
    # not reach its transformer: level_embeds would stay torch.Tensor's
    # uninitialised memory (different from run to run).  Zeros (plus the
    # perturbation), what that memory held in the runs this test was
    # written with.  (With the transformer's own normal init instead, the
    # unpadded image's scores differ by up to 1e-3: not yet explained.)
    model.query_head.transformer.level_embeds.data.zero_()
    perturb(model)
    return model.eval()


@torch.no_grad()
def perturb(model, seed=1):
    """Add a seeded normal to every float parameter and buffer (BN running
    variances scaled instead, to stay positive)."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if name.endswith('running_var'):
            tensor.mul_(1 + 0.1 * noise.abs())
        else:
            scale = 0.02 if tensor.numel() > 1 else 0.1
            tensor.add_(noise * scale)


def make_inputs(shapes, seed=0):
    """Normalised images zero-padded to the batch shape, and their metas."""
    gen = torch.Generator().manual_seed(seed)
    pad_h, pad_w = (max(s[i] for s in shapes) for i in (0, 1))
    inputs = torch.zeros(len(shapes), 3, pad_h, pad_w)
    metas = []
    for i, (h, w) in enumerate(shapes):
        inputs[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        metas.append(
            dict(
                img_shape=(h, w),
                ori_shape=(round(h / SCALE), round(w / SCALE)),
                pad_shape=(pad_h, pad_w),
                batch_input_shape=(pad_h, pad_w),
                scale_factor=(SCALE, SCALE)))
    return inputs, metas


def samples_of(metas):
    from mmdet.structures import DetDataSample
    return [DetDataSample(metainfo=dict(m)) for m in metas]


@torch.no_grad()
def predict(model, inputs, metas):
    """The query head's predictions (``eval_module='detr'``), in the
    original images' pixels, per test-time NMS of :data:`NMS` (as
    ``test_cfg[0].nms``).

    ``CoDETR.predict`` (``use_lsj=False``) is ``extract_feat`` then
    ``query_head.predict`` = ``forward`` + ``predict_by_feat``; the forward
    runs once for all NMS settings.
    """
    from mmengine.config import ConfigDict
    metas = [s.metainfo for s in samples_of(metas)]
    outs = model.query_head(model.extract_feat(inputs), metas)
    predictions = {}
    for name, nms in NMS.items():
        model.query_head.test_cfg = ConfigDict(max_per_img=300, nms=nms)
        results = model.query_head.predict_by_feat(
            *outs, batch_img_metas=metas, rescale=True)
        predictions[name] = [{
            key: getattr(r, key).clone()
            for key in ('bboxes', 'scores', 'labels')
        } for r in results]
    return predictions


@torch.no_grad()
def predict_lsj(model, inputs, metas):
    """``CoDETR.predict`` with ``use_lsj=True``, NMS-free.

    ``use_lsj`` is meant to replace each ``img_shape`` by the padded batch
    shape, but mmdet's port writes it into ``data_sample.metainfo``, a new
    dict at every access: nothing changes (Sense-X's mmdet 2.x code, with
    plain dict metas, does change them).
    """
    from mmengine.config import ConfigDict
    model.use_lsj = True
    model.query_head.test_cfg = ConfigDict(max_per_img=300, nms=None)
    samples = model.predict(inputs, samples_of(metas), rescale=True)
    model.use_lsj = False
    return [{
        key: getattr(s.pred_instances, key).clone()
        for key in ('bboxes', 'scores', 'labels')
    } for s in samples]


@torch.no_grad()
def aux_content(model, anchors):
    """Content of the customized queries on ``anchors`` (1, n, 4), cxcywh
    in [0, 1], per official aux index j, as ``CoDinoTransformer.forward_aux``
    computes it (``with_coord_feat=False``)."""
    from mmdet.models.layers.transformer import inverse_sigmoid
    transformer = model.query_head.transformer
    sine = transformer.get_proposal_pos_embed(inverse_sigmoid(anchors))
    return [
        norm(linear(sine)) for linear, norm in zip(
            transformer.aux_pos_trans, transformer.aux_pos_trans_norm)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('out_dir', help='folder to write the .pth files to')
    parser.add_argument('--reference', default=reference_dir())
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = build_reference(args.reference)
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(note='random weights, official layout')),
        osp.join(args.out_dir, 'co_dino_official.pth'))
    outputs = {}
    for batch, shapes in BATCHES.items():
        inputs, metas = make_inputs(shapes)
        outputs[batch] = dict(
            inputs=inputs,
            metas=metas,
            predictions=predict(model, inputs, metas))
    outputs['padded']['codetr_predict'] = predict_lsj(
        model, outputs['padded']['inputs'], outputs['padded']['metas'])
    anchors = torch.rand(1, 7, 4, generator=torch.Generator().manual_seed(2))
    outputs['aux_anchors'] = anchors * 0.9 + 0.05
    outputs['aux_content'] = aux_content(model, outputs['aux_anchors'])
    torch.save(outputs, osp.join(args.out_dir, 'reference.pth'))


if __name__ == '__main__':
    main()
