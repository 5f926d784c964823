"""ONNX deployment of DETR+ detectors (optional ``deploy`` extra).

* :class:`ExportableDetector` (the DETRs), :class:`ExportableDDQFCN` and
  :class:`ExportableDDQRCNN`: a detector's inference graph, preprocessed
  images in, ``dets`` (B, K, 5) and ``labels`` (B, K) out (:func:`exportable`
  picks the one for a detector);
* :func:`export_onnx`: that graph to an ONNX file through
  ``torch.onnx.export(..., dynamo=True)``, MSDeformAttn lowered to standard
  ONNX (:mod:`projects_detr_plus.ops.onnx_lowering`) and DDQ's NMS to
  ``NonMaxSuppression``;
* :class:`OnnxDetector`: an ONNX Runtime session with the same outputs.

onnx, onnxruntime and onnxscript are needed only when exporting or running
(``pip install "projects_detr_plus[deploy]"``); a clear ImportError names
the extra when they are missing.
"""
from .ddq_fcn import ExportableDDQFCN
from .ddq_rcnn import ExportableDDQRCNN
from .detr import ExportableDetector
from .export import export_onnx, exportable, translation_table
from .requirements import require
from .runtime import OnnxDetector

__all__ = [
    'ExportableDetector', 'ExportableDDQFCN', 'ExportableDDQRCNN',
    'exportable', 'export_onnx', 'translation_table', 'OnnxDetector', 'require'
]
