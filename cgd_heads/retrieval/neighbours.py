"""Exact top-k inner-product neighbours (faiss ``IndexFlatIP``) for the post-processing steps, with each query's
own item left out or put first by index (query-vs-rest), never by position: exact duplicates tie with it."""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .faiss_import import faiss

__all__ = ['flat_index', 'top_neighbours']


def flat_index(vectors: np.ndarray) -> Any:
    """An exact inner-product faiss index holding the float32 ``(N, D)`` ``vectors`` (ids ``0 .. N-1``)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def top_neighbours(index: Any, queries: np.ndarray, k: int, self_ids: Optional[np.ndarray] = None,
                   keep_self: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` items of ``index`` with the largest inner product ``<q, x>`` per query, best first.

    Args:
        index: A faiss index from :func:`flat_index`.
        queries: float32 ``(Q, D)`` array.
        k: Neighbours per query, ``0 <= k <= index.ntotal`` (``<= ntotal - 1`` with ``self_ids`` and not
            ``keep_self``); the callers clamp it.
        self_ids: Id of each query's own item in the index (query-vs-rest), or None. With it, the own id is
            removed wherever faiss ranks it; if it is not among the ``k + 1`` searched (more than ``k`` exact
            duplicates tie with it), the last one is dropped instead.
        keep_self: With ``self_ids``, put the own id first instead (score ``<q, q>``), followed by the ``k - 1``
            nearest other items: "itself counted as the first neighbour" whatever the ties.

    Returns:
        ``(scores, ids)``: float32 and int64 arrays of shape ``(Q, k)``.
    """
    others = k - 1 if keep_self and self_ids is not None else k
    depth = others + (self_ids is not None)
    if depth > 0:
        scores, ids = index.search(queries, depth)
    else:
        scores, ids = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    if self_ids is not None and depth > 0:
        is_self = ids == self_ids[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        scores, ids = scores[~is_self].reshape(len(queries), others), ids[~is_self].reshape(len(queries), others)
    if keep_self and self_ids is not None:
        own = np.einsum('ij,ij->i', queries, queries)[:, None].astype(np.float32)
        scores, ids = np.hstack([own, scores]), np.hstack([self_ids[:, None].astype(np.int64), ids])
    if (ids < 0).any():
        # IndexFlatIP returns valid ids whenever k <= ntotal and the inputs are finite, both checked by the callers
        raise RuntimeError(f'faiss returned fewer than k={k} neighbours for some query; this is a bug')
    return scores, ids.astype(np.int64, copy=False)
