"""Run an exported DETR+ ONNX file in ONNX Runtime."""
from typing import Optional, Sequence, Tuple

import numpy as np

from .requirements import require

__all__ = ['OnnxDetector']


class OnnxDetector:
    """An ONNX Runtime session of a file written by :func:`export_onnx`.

    Args:
        path (str): the .onnx file.
        providers (Sequence[str]): ONNX Runtime execution providers
            (default CPU).
        threads (int, optional): intra-op threads (default: ONNX Runtime's).
        spinning (bool): let idle intra-op threads spin (ONNX Runtime's
            default); turn it off when PyTorch computes in the same process
            and cores are few, or the spinning threads slow PyTorch down.

    Raises:
        ImportError: when onnxruntime is missing, naming the deploy extra.
    """

    def __init__(self,
                 path: str,
                 providers: Sequence[str] = ('CPUExecutionProvider', ),
                 threads: Optional[int] = None,
                 spinning: bool = True):
        ort = require('onnxruntime')
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            options.add_session_config_entry('session.intra_op.allow_spinning',
                                             '0')
        self.session = ort.InferenceSession(
            str(path), options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def metadata(self):
        """The file's ``metadata_props`` (dict)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, inputs) -> Tuple[np.ndarray, np.ndarray]:
        """Detections of a preprocessed batch.

        Args:
            inputs (Tensor | ndarray): (B, 3, H, W) float32.

        Returns:
            tuple[ndarray, ndarray]: dets (B, K, 5), labels (B, K).
        """
        if hasattr(inputs, 'detach'):
            inputs = inputs.detach().cpu().numpy()
        inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        if inputs.ndim != 4:
            raise ValueError('inputs must be (B, C, H, W), got shape '
                             f'{inputs.shape}')
        dets, labels = self.session.run(self.output_names,
                                        {self.input_name: inputs})
        return dets, labels
