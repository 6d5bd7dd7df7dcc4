"""Embedding matrices as faiss wants them: C-contiguous float32 numpy arrays of unit rows, checked once."""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from ..utils.checks import check_bool

__all__ = ['ArrayLike', 'to_embedding_array', 'UNIT_NORM_TOLERANCE']

#: Largest accepted ``| ||x|| - 1 |`` for an embedding to count as unit norm. Loose enough for embeddings stored
#: in fp16/bf16 (rounding moves the norm by ~1e-4), tight enough to catch un-normalised ones (norms of 0.3 or 10).
UNIT_NORM_TOLERANCE = 1e-2
# Rows checked per block, so validating 100k x 1536 embeddings allocates only ~6 MB of temporaries at a time.
_CHECK_BLOCK_ROWS = 4096

ArrayLike = Union[np.ndarray, torch.Tensor]


def to_embedding_array(x: Any, name: str = 'embeddings', normalize: bool = False) -> np.ndarray:
    """Validate an embedding matrix and return it as a C-contiguous float32 numpy array of unit rows.

    Args:
        x: 2-D torch tensor or numpy array of a floating dtype, shape ``(N, D)`` with ``N, D >= 1``. Tensors may
            live on any device and need no grad detaching.
        name: Argument name used in error messages.
        normalize: If True, return ``x / ||x||`` row-wise (a copy; a zero row raises). If False (default),
            every row must already satisfy ``| ||x|| - 1 | <= UNIT_NORM_TOLERANCE``; the rows are returned as
            they are, not renormalised.

    Returns:
        float32 array of shape ``(N, D)``; no copy when ``x`` already is a C-contiguous float32 numpy array of
        unit rows.

    Raises:
        TypeError: ``x`` is not a tensor/array or has a non-floating dtype.
        ValueError: wrong rank, empty, non-finite values, zero rows (``normalize=True``) or rows that are not
            unit norm (``normalize=False``).
    """
    normalize = check_bool(normalize, 'normalize')
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f'{name} must have a floating dtype, got torch tensor of dtype {x.dtype}')
        # bf16 has no numpy equivalent; float32 is also what faiss computes in
        x = x.detach().to(device='cpu', dtype=torch.float32).numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != 'f':
            raise TypeError(f'{name} must have a floating dtype, got numpy array of dtype {x.dtype}')
    else:
        raise TypeError(f'{name} must be a torch.Tensor or numpy.ndarray of shape (N, D), got {type(x).__name__}')
    if x.ndim != 2:
        raise ValueError(f'{name} must be 2-D (N, D), got shape {tuple(x.shape)}')
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f'{name} must be non-empty, got shape {tuple(x.shape)}')
    # normalising works in place, so it gets its own copy: the caller's array (or the tensor whose memory
    # .numpy() shares) must not change
    x = np.array(x, dtype=np.float32, order='C', copy=True) if normalize else np.ascontiguousarray(x, np.float32)
    for start in range(0, x.shape[0], _CHECK_BLOCK_ROWS):
        block = x[start:start + _CHECK_BLOCK_ROWS]
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f'{name} must be finite, row {bad} contains NaN or inf')
        # float32 sums of D squares err by <= D * 6e-8 (1e-4 for D = 1536), far inside the tolerance
        norms = np.sqrt(np.einsum('ij,ij->i', block, block))
        if normalize:
            if (norms == 0).any():
                bad = start + int(np.flatnonzero(norms == 0)[0])
                raise ValueError(f'{name} row {bad} is all zeros and cannot be L2-normalised')
            block[:] = block / norms[:, None]
        elif (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).any():
            bad = start + int(np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)[0])
            raise ValueError(
                f'{name} must be L2-normalised (|norm - 1| <= {UNIT_NORM_TOLERANCE}), row {bad} has norm '
                f'{norms[bad - start]:.6g}; normalise them first or pass normalize=True'
            )
    return x
