"""Export the inference model (image -> embedding) to ONNX, verified with onnxruntime when it is installed.

The graph is captured with ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath) with a dynamic
batch dimension, weights embedded in the file. Verification runs the exported file on a batch of another size than
the one exported with and compares it to PyTorch; it also checks that different images give different embeddings
(a known failure of exported retrieval models is a graph that returns the same output for every input).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..utils.atomic import atomic_path
from ..utils.checks import PathLike, check_int

__all__ = ['export_onnx', 'verify_onnx', 'ONNX_ATOL']

#: Largest absolute difference accepted between onnxruntime and PyTorch embeddings (unit vectors, float32).
ONNX_ATOL = 1e-4


def _input_size(model: nn.Module, input_size: Optional[Tuple[int, int, int]]) -> Tuple[int, int, int]:
    if input_size is not None:
        return tuple(input_size)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return tuple(cfg.get('input_size') or (3, 224, 224))


def _require_export_packages(verify: bool) -> None:
    """Raise one ImportError naming every missing package of the export (before any work is done): torch's ONNX
    exporter needs ``onnx`` and ``onnxscript``, the verification ``onnxruntime``."""
    needed = ('onnx', 'onnxscript') + (('onnxruntime',) if verify else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"exporting to ONNX needs {', '.join(missing)}: pip install 'cgd_heads[export]' "
                          '(onnx, onnxscript, onnxruntime)')


def export_onnx(
        model: nn.Module,
        path: PathLike,
        input_size: Optional[Tuple[int, int, int]] = None,
        opset: int = 18,
        verify: bool = True,
) -> Path:
    """Write ``model`` (images ``(N, C, H, W)`` -> embeddings ``(N, D)``) to ``path`` as ONNX, atomically.

    Args:
        model: A CGDModel (or any module mapping images to embeddings); exported in eval mode.
        path: Destination ``.onnx`` file.
        input_size: (C, H, W) of the exported graph; default the model's ``pretrained_cfg['input_size']``. The batch
            size stays dynamic, the spatial size is fixed.
        opset: ONNX opset version.
        verify: Check the file with onnxruntime (:func:`verify_onnx`); needs the ``onnxruntime`` package.

    Returns:
        The path written.

    Raises:
        ImportError: ``onnx`` or ``onnxscript`` (or, with ``verify``, ``onnxruntime``) is missing: the ``export``
            extra installs them.
        ValueError: ``path`` does not end in ``.onnx``; the verification fails (``path`` is then left as it was).
        TypeError: ``opset`` is not an int.
    """
    path = Path(path)
    if path.suffix != '.onnx':
        raise ValueError(f'path must end in .onnx, got {path}')
    opset = check_int(opset, 'opset')
    _require_export_packages(verify)
    size = _input_size(model, input_size)
    was_training = model.training
    model.eval()
    example = torch.randn(2, *size)
    batch = torch.export.Dim('batch', min=1)
    try:
        with atomic_path(path) as tmp:
            onnx_program = torch.onnx.export(model, (example,), input_names=['images'], output_names=['embeddings'],
                                             dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True)
            onnx_program.save(str(tmp), external_data=False)
            if verify:  # before the swap: a file that fails the check never replaces an earlier good export
                try:
                    verify_onnx(model, tmp, size)
                except ValueError as exc:
                    raise ValueError(f'{path} not written: {exc}') from exc
    finally:
        model.train(was_training)
    return path


def verify_onnx(model: nn.Module, path: PathLike, input_size: Tuple[int, int, int],
                batch_size: int = 3, atol: float = ONNX_ATOL) -> float:
    """Compare onnxruntime with PyTorch on random images; returns the max absolute difference.

    Raises:
        ImportError: onnxruntime is missing.
        ValueError: the outputs differ by more than ``atol``, or the exported graph ignores its input.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("verifying an ONNX export needs onnxruntime: pip install 'cgd_heads[export]'") from e
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    images = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
    exported = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():
        reference = model.eval()(images).numpy()
    diff = float(np.abs(exported - reference).max())
    if exported.shape != reference.shape or diff > atol:
        raise ValueError(f'{path}: onnxruntime output {exported.shape} differs from PyTorch {reference.shape} by '
                         f'{diff:.2e} > {atol:.0e}')
    if np.abs(exported[0] - exported[1:]).max() < 1e-6:
        raise ValueError(f'{path}: different images give the same embedding: the exported graph ignores its input')
    return diff
