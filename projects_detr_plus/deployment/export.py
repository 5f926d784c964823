"""Export a DETR+ detector to ONNX with ``torch.onnx.export(dynamo=True)``."""
import os
import os.path as osp
import warnings
from typing import Dict, Optional, Sequence

import torch

from ..ops.nms import nms_translation_table
from ..ops.onnx_lowering import MSDA_MODES, msda_translation_table
from .ddq_fcn import ExportableDDQFCN
from .ddq_rcnn import ExportableDDQRCNN
from .detr import ExportableDetector
from .mmdet_patches import flat_sampling_locations
from .requirements import require

__all__ = ['export_onnx', 'translation_table', 'INPUT_NAME', 'OUTPUT_NAMES']

INPUT_NAME = 'input'
OUTPUT_NAMES = ('dets', 'labels')
# GridSample (the MSDeformAttn decomposition) needs 16 and the exporter's
# LayerNormalization 17, but torch's exporter builds at 18 and does not
# convert to older opsets (onnx's converter fails on these graphs)
MIN_OPSET = 18


def translation_table(msda: str = 'decompose') -> Dict:
    """Every DETR+ custom op's ONNX translation (MSDeformAttn, NMS).

    Args:
        msda (str): one of :data:`MSDA_MODES`: ``'decompose'`` (standard
            ONNX, GridSample), ``'gather'`` (standard ONNX, Gather +
            MatMul) or ``'custom'`` (one ``detr_plus.MSDeformAttn`` node),
            see :mod:`projects_detr_plus.ops.onnx_lowering`.
    """
    table = msda_translation_table(msda)
    table.update(nms_translation_table())
    return table


def _dynamic_shapes(dynamic_batch, dynamic_size, size_divisor=1):
    """torch.export ``dynamic_shapes`` of the ``inputs`` argument; the
    height and width are ``size_divisor`` x a dynamic integer."""
    dim = torch.export.Dim
    axes = {}
    if dynamic_batch:
        axes[0] = dim('batch', min=1, max=1024)
    if dynamic_size and size_divisor == 1:
        axes[2] = dim.DYNAMIC
        axes[3] = dim.DYNAMIC
    elif dynamic_size:
        limit = 16384 // size_divisor
        axes[2] = size_divisor * dim('height_blocks', min=1, max=limit)
        axes[3] = size_divisor * dim('width_blocks', min=1, max=limit)
    return {'inputs': axes} if axes else None


def export_program(wrapper,
                   example,
                   dynamic_batch=True,
                   dynamic_size=True,
                   size_divisor=None):
    """``torch.export`` (non-strict) of :class:`ExportableDetector`.

    Exported here rather than by ``torch.onnx.export``, which falls back to
    ``draft_export`` when ``torch.export`` fails: a graph that may be wrong
    for inputs unlike the example.  While tracing, the MSDeformAttn
    modules compute their sampling locations in a form ONNX Runtime runs
    faster, with the same values
    (:func:`~.mmdet_patches.flat_sampling_locations`).

    Args:
        size_divisor (int, optional): dynamic heights and widths are
            multiples of it.  None: any size, or multiples of 32 (with a
            warning) when torch.export cannot express the model's size
            conditions otherwise (Swin backbones).

    Returns:
        tuple[ExportedProgram, int]: the program and the size divisor.
    """
    divisors = [size_divisor] if size_divisor else [1, 32]
    for index, divisor in enumerate(divisors):
        if dynamic_size and any(s % divisor for s in example.shape[2:]):
            raise ValueError(f'the example size {tuple(example.shape[2:])} '
                             f'must be a multiple of {divisor}')
        try:
            with torch.no_grad(), flat_sampling_locations(wrapper):
                program = torch.export.export(
                    wrapper, (example, ),
                    strict=False,
                    dynamic_shapes=_dynamic_shapes(dynamic_batch, dynamic_size,
                                                   divisor))
            return program, divisor
        except Exception as error:  # noqa: BLE001 - retried, then raised
            if index + 1 == len(divisors):
                raise
            warnings.warn(f'torch.export failed with any image size '
                          f'({type(error).__name__}); exporting for sizes '
                          f'that are multiples of {divisors[index + 1]}')
    raise AssertionError('unreachable')


def _checked(model) -> bool:
    """Whether onnx's checker accepts the (onnx_ir) model."""
    import onnx
    import onnx_ir
    try:
        onnx.checker.check_model(onnx_ir.to_proto(model))
    except onnx.checker.ValidationError:
        return False
    return True


def _optimize(program) -> None:
    """The exporter's graph optimisation (constant folding, rewrites), in
    place; the unoptimised graph is kept if the result is invalid.

    onnxscript 0.5-0.7's Min/Max -> Clip rewrite leaves a Clip reading a
    removed value in Deformable DETR's graphs (``inverse_sigmoid``'s
    clamps), so the optimisation runs without that rule when onnxscript
    has it.
    """
    import onnx_ir
    from onnxscript import optimizer, rewriter
    backup = onnx_ir.to_proto(program.model)
    rules = getattr(rewriter, '_DEFAULT_REWRITE_RULES', None)
    try:
        from onnxscript.rewriter.rules.common import _min_max_to_clip
        broken = set(_min_max_to_clip.rules)
    except ImportError:
        broken = set()
    if rules is not None:
        rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in rules
                                                if rule not in broken)
    try:
        optimizer.optimize_ir(program.model)
    finally:
        if rules is not None:
            rewriter._DEFAULT_REWRITE_RULES = rules
    if not _checked(program.model):
        warnings.warn('the optimised ONNX graph is invalid (an onnxscript '
                      'optimizer problem); saving the unoptimised graph')
        program.model = onnx_ir.from_proto(backup)


def exportable(detector):
    """The traceable ``inputs -> (dets, labels)`` module of ``detector``:
    :class:`ExportableDDQFCN` for DDQ FCN, :class:`ExportableDDQRCNN` for
    DDQ R-CNN, else :class:`ExportableDetector` (the DETRs)."""
    from ..models.detectors.ddq_fcn import DDQFCN
    from ..models.detectors.ddq_rcnn import DDQRCNN
    if isinstance(detector, DDQFCN):
        return ExportableDDQFCN(detector)
    if isinstance(detector, DDQRCNN):
        return ExportableDDQRCNN(detector)
    return ExportableDetector(detector)


def _warn_if_slow_dynamic_size(detector) -> None:
    """Swin's window padding (to multiples of the window at every stage)
    makes torch.export's symbolic size analysis very slow: a dynamic-size
    export of DINO Swin-L at 256 px did not finish in over an hour of CPU
    here, where a fixed size took 141 s."""
    backbone = getattr(detector, 'backbone', None)
    if type(backbone).__name__ == 'SwinTransformer':
        warnings.warn(
            'a dynamic-size export of a Swin backbone can take hours of '
            "torch.export's symbolic shape analysis (its window padding); "
            'export a fixed size (dynamic_size=False, --static-size) and '
            'resize or pad inputs to it')


def export_onnx(detector: torch.nn.Module,
                out: str,
                input_shape: Sequence[int] = (2, 3, 640, 640),
                dynamic_batch: bool = True,
                dynamic_size: bool = True,
                opset: int = 18,
                msda: str = 'decompose',
                metadata: Optional[Dict[str, str]] = None,
                optimize: bool = True,
                size_divisor: Optional[int] = None):
    """Export ``detector``'s inference graph to the ONNX file ``out``.

    Args:
        detector (nn.Module): a DETR+ detector; it is put in eval mode.
        out (str): the .onnx file to write (folders are created).
        input_shape (tuple): (B, 3, H, W) of the example batch it is traced
            with; the exported sizes are those unless dynamic.  With a
            dynamic batch, B must be >= 2 (torch.export specialises sizes
            of 1); 2 is used when it is 1.
        dynamic_batch (bool): any batch size at run time.
        dynamic_size (bool): any image height and width at run time (see
            ``size_divisor``; the file's ``detr_plus.size_divisor`` metadata
            says which).
        opset (int): ONNX opset, >= 18 (see :data:`MIN_OPSET`).
        msda (str): how MSDeformAttn is emitted: ``'decompose'`` (standard
            operators, one GridSample per level; the fastest in ONNX
            Runtime on the CPU), ``'gather'`` (standard operators without
            GridSample: Gather + MatMul) or ``'custom'`` (one
            ``detr_plus.MSDeformAttn`` node, needs a runtime kernel).
        metadata (dict, optional): more ``metadata_props`` for the file.
        optimize (bool): run the exporter's graph optimisations.
        size_divisor (int, optional): with a dynamic size, heights and widths
            are multiples of it; None: any size when torch.export can
            express the model's conditions, else multiples of 32 (see
            :func:`export_program`).

    Returns:
        torch.onnx.ONNXProgram: the exported program (already saved).

    Inputs / outputs of the file: ``input`` (B, 3, H, W) float32, the
    preprocessed batch; ``dets`` (B, K, 5) and ``labels`` (B, K), see
    :mod:`.outputs`.
    """
    require('onnx', 'onnxscript')
    if opset < MIN_OPSET:
        raise ValueError(f'opset must be >= {MIN_OPSET} (torch.onnx builds '
                         f'at 18 and does not convert down), got {opset}')
    if msda not in MSDA_MODES:
        raise ValueError(f'msda must be one of {MSDA_MODES}, got {msda!r}')
    shape = [int(s) for s in input_shape]
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError('input_shape must be (B, C, H, W), got '
                         f'{tuple(input_shape)}')
    if dynamic_batch and shape[0] == 1:
        shape[0] = 2
    wrapper = exportable(detector.eval()).eval()
    if dynamic_size:
        _warn_if_slow_dynamic_size(detector)
    smallest = getattr(wrapper, 'min_dynamic_size', 1)
    if dynamic_size and min(shape[2:]) < smallest:
        raise ValueError(
            f'input_shape {tuple(shape)}: a dynamic-size export of '
            f'{type(detector).__name__} needs an example of at least '
            f'{smallest} pixels a side (torch.export would fix its '
            'smallest feature level to 1 pixel)')
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    example = example.to(next(detector.parameters()).device)
    exported, divisor = export_program(wrapper, example, dynamic_batch,
                                       dynamic_size, size_divisor)
    with torch.no_grad():
        program = torch.onnx.export(
            exported,
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            custom_translation_table=translation_table(msda),
            optimize=False,
            verbose=False)
    if optimize:
        _optimize(program)
    props = {
        'producer': 'projects_detr_plus',
        'detr_plus.outputs': 'dets (B, K, 5) x1 y1 x2 y2 score in input '
        'pixels; labels (B, K), -1 for empty rows',
        'detr_plus.max_per_img': str(wrapper.max_per_img),
        'detr_plus.msda': msda,
        'detr_plus.size_divisor': str(divisor if dynamic_size else 0),
        'detr_plus.detector': type(detector).__name__
    }
    props.update(metadata or {})
    program.model.metadata_props.update(props)
    folder = osp.dirname(osp.abspath(out))
    os.makedirs(folder, exist_ok=True)
    program.save(out)
    return program
