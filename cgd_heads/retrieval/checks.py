"""Argument checks of the retrieval layer: label vectors, bounded real numbers, and a gallery that must be the
queries themselves (query-vs-rest), each raising TypeError/ValueError that name the argument."""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

__all__ = ['as_labels', 'check_real', 'check_same_dim', 'self_ids']


def as_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """Return ``labels`` as a 1-D numpy array of length ``n`` with an integer, bool or string dtype."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    elif not isinstance(labels, np.ndarray):
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            raise TypeError(
                f'{name} must be a 1-D tensor, array or sequence of ints or strs, got {type(labels).__name__}'
            )
        texts = [isinstance(v, (str, bytes)) for v in labels]
        if any(texts) and not all(texts):  # numpy would turn the ints into strings: 1 and '1' one class
            raise TypeError(f'{name} must hold only ints or only strs, got a mix of both')
        labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f'{name} must be 1-D, got shape {labels.shape}')
    # floats are refused: 1.0 vs 1.0000001 would silently be two classes
    if labels.dtype.kind not in 'iubUS':
        raise TypeError(f'{name} must hold ints or strs, got dtype {labels.dtype}')
    if len(labels) != n:
        raise ValueError(f'{name} must have one entry per embedding ({n}), got {len(labels)}')
    return labels


def check_real(value: Any, name: str, minimum: float, maximum: Optional[float] = None) -> float:
    """Return ``value`` as a float if it is a finite real number (not a bool) in ``[minimum, maximum]``.

    Raises:
        TypeError: ``value`` is not an int or float (a string, a bool, None, an array).
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    valid = f'a real number in [{minimum}, {maximum}]' if maximum is not None else f'a real number >= {minimum}'
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f'{name} must be {valid}, got {type(value).__name__} {value!r}')
    value = float(value)
    if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f'{name} must be {valid}, got {value!r}')
    return value


def check_same_dim(reference: np.ndarray, other: np.ndarray, reference_name: str, other_name: str) -> None:
    """Raise ValueError unless both ``(N, D)`` matrices have the same ``D``."""
    if other.shape[1] != reference.shape[1]:
        raise ValueError(f'{other_name} must have the same dim as {reference_name} ({reference.shape[1]}), got '
                         f'shape {other.shape}')


def self_ids(queries: np.ndarray, gallery: np.ndarray, query_vs_rest: bool) -> Optional[np.ndarray]:
    """Each query's own gallery id (``arange(N)``) in query-vs-rest mode, after checking that the gallery really
    is the queries (row ``i`` of both equal); None otherwise.

    Raises:
        TypeError: ``query_vs_rest`` is not a bool.
        ValueError: ``query_vs_rest`` is True and the gallery differs from the queries.
    """
    if not isinstance(query_vs_rest, (bool, np.bool_)):
        raise TypeError(f'query_vs_rest must be a bool, got {type(query_vs_rest).__name__} {query_vs_rest!r}')
    if not query_vs_rest:
        return None
    # excluding "the query itself" by index is only meaningful when item i of the gallery is query i
    if queries.shape != gallery.shape or not np.array_equal(queries, gallery):
        raise ValueError(
            'query_vs_rest=True needs the gallery to be the queries themselves (row i of both the same item), got '
            f'queries of shape {queries.shape} and a gallery of shape {gallery.shape} that differ; pass '
            'query_vs_rest=False for a separate gallery'
        )
    return np.arange(len(queries))
