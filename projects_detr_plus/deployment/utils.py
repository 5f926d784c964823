"""Helpers shared by the deployment tools, tests and benchmark."""
import copy
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.config import Config

from .verify import match_detections

__all__ = [
    'build_detector', 'reference_predictions', 'verify_export',
    'test_pipeline', 'dataset_meta'
]


def build_detector(config,
                   checkpoint: Optional[str] = None,
                   device: str = 'cpu',
                   cfg_options: Optional[Dict] = None):
    """The config's detector in eval mode, with ``checkpoint`` loaded.

    Without a checkpoint the weights are the config's initialisation
    (``init_weights``) with seed 0, and no pretrained backbone is fetched.
    """
    from mmdet.apis import init_detector
    cfg = config if isinstance(config, Config) else Config.fromfile(config)
    cfg = copy.deepcopy(cfg)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if checkpoint is None:
        cfg.model.backbone.init_cfg = None
        torch.manual_seed(0)
        model = init_detector(cfg, None, device=device)
        model.init_weights()
        return model.eval()
    return init_detector(cfg, checkpoint, device=device).eval()


def reference_predictions(model, inputs) -> List:
    """PyTorch ``predict(rescale=False)`` of a preprocessed batch whose
    images fill the input (img_shape = input shape).

    Args:
        inputs (Tensor): (B, 3, H, W).

    Returns:
        list[InstanceData]: per image, bboxes (n, 4), scores, labels.
    """
    from mmdet.structures import DetDataSample
    h, w = inputs.shape[-2:]
    samples = [
        DetDataSample(
            metainfo=dict(
                img_shape=(h, w),
                batch_input_shape=(h, w),
                ori_shape=(h, w),
                scale_factor=(1.0, 1.0))) for _ in range(inputs.shape[0])
    ]
    with torch.no_grad():
        results = model.predict(inputs, samples, rescale=False)
    return [r.pred_instances.cpu() for r in results]


def verify_export(model,
                  onnx_file: str,
                  input_shape: Sequence[int],
                  seed: int = 0,
                  score_atol: float = 1e-4,
                  box_rtol: float = 1e-4) -> Dict:
    """Run ``onnx_file`` in ONNX Runtime and ``model.predict`` on one
    random batch and match the detections (:func:`match_detections`).

    Args:
        input_shape (tuple): (B, 3, H, W) of the random batch.
        box_rtol (float): box tolerance as a fraction of max(H, W), or of
            the box's largest absolute coordinate where that is larger.

    Returns:
        dict: ``ok``, ``summary`` (str), ``images``: one
        :func:`match_detections` report per image.
    """
    from .runtime import OnnxDetector
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(*input_shape, generator=gen)
    device = next(model.parameters()).device
    refs = reference_predictions(model, inputs.to(device))
    dets, labels = OnnxDetector(onnx_file)(inputs)
    box_atol = box_rtol * max(input_shape[-2:])
    images = [
        match_detections(d, l, r.bboxes.numpy(), r.scores.numpy(),
                         r.labels.numpy(), score_atol, box_atol, box_rtol)
        for d, l, r in zip(dets, labels, refs)
    ]
    ok = all(report['ok'] for report in images)
    summary = (f'ONNX Runtime vs PyTorch on a random {tuple(input_shape)} '
               f'batch: {"same detections" if ok else "MISMATCH"}; '
               f'{sum(r["matched"] for r in images)} matched, max score '
               f'diff {max(r["max_score_diff"] for r in images):.2g}, max box '
               f'diff {max(r["max_box_diff"] for r in images):.2g} px')
    for index, report in enumerate(images):
        for problem in report['problems'][:5]:
            summary += f'\n  image {index}: {problem}'
    return dict(ok=ok, summary=summary, images=images)


def test_pipeline(cfg: Config):
    """The config's test pipeline without annotation loading, composed."""
    from mmcv.transforms import Compose
    from mmdet.utils import get_test_pipeline_cfg
    steps = [
        step for step in copy.deepcopy(get_test_pipeline_cfg(cfg))
        if step['type'] != 'LoadAnnotations'
    ]
    return Compose(steps)


def dataset_meta(cfg: Config) -> Dict:
    """Class names and palette of the config's test dataset."""
    from mmdet.registry import DATASETS
    dataset = cfg.test_dataloader.dataset
    while 'dataset' in dataset:  # wrappers
        dataset = dataset.dataset
    meta = dict(getattr(DATASETS.get(dataset.type), 'METAINFO', {}))
    meta.update(dataset.get('metainfo', None) or {})
    if 'classes' not in meta:
        raise ValueError(f'no class names for {dataset.type}')
    return meta


def rescale_boxes(boxes: np.ndarray, scale_factor) -> np.ndarray:
    """Boxes (n, 4) of the resized image back to the original image
    (mmdet's ``rescale=True``: divide by (w_scale, h_scale))."""
    w_scale, h_scale = scale_factor
    return boxes / np.array([w_scale, h_scale, w_scale, h_scale],
                            dtype=boxes.dtype)
