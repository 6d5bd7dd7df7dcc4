"""Query expansion and database-side augmentation of L2-normalised embeddings (Radenovic, Tolias, Chum, "Fine-tuning
CNN image retrieval with no human annotation", TPAMI 2018: alpha-QE; DBA after Arandjelovic & Zisserman 2012).

For a vector q with neighbours g_1, g_2, ... ranked by decreasing inner product s_i = <q, g_i>, the expansion
with n neighbours and exponent alpha is

    q' = normalise(q + sum_{i <= n} w_i * g_i),    w_i = max(s_i, 0) ** alpha    (alpha > 0)
                                                   w_i = 1                       (alpha = 0: average QE)

q itself enters with weight 1 (= <q, q> ** alpha). ``normalise(v) = v / ||v||``; a sum that cancels to the zero
vector (possible only for alpha = 0 with opposite neighbours) leaves q unchanged. Neighbours come from an exact
faiss ``IndexFlatIP`` search; ties among equal scores are ranked in faiss's order.
"""
from __future__ import annotations

import numpy as np

from ..utils.checks import check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import check_real, check_same_dim, self_ids
from .neighbours import flat_index, top_neighbours

__all__ = ['query_expansion', 'database_augmentation']


def query_expansion(queries: ArrayLike, gallery: ArrayLike, n: int, alpha: float = 0.0,
                    query_vs_rest: bool = False, normalize: bool = False) -> np.ndarray:
    """alpha-QE: each query becomes ``normalise(q + sum_{i <= n} w_i g_i)`` over its top-n gallery neighbours.

    ``w_i = max(<q, g_i>, 0) ** alpha``, or 1 for every neighbour when ``alpha = 0`` (average QE, also for
    negative scores). See the module docstring.

    Args:
        queries: ``(Q, D)`` L2-normalised query embeddings (tensor or array).
        gallery: ``(G, D)`` L2-normalised gallery embeddings the neighbours are taken from.
        n: Neighbours per query, an int >= 0 (0 returns the queries unchanged). Clamped to the gallery items a
            query can use: ``n_eff = min(n, G)``, or ``min(n, G - 1)`` with ``query_vs_rest``; with ``n >= G``
            every gallery item takes part (QE towards the weighted gallery sum), never an error.
        alpha: Exponent of the weights, a real >= 0 (Radenovic et al. use 3).
        query_vs_rest: The gallery IS the queries (row i of both the same item, checked): query i then never
            uses gallery item i, i.e. itself, as an expansion neighbour (removed by index, so an exact duplicate
            of it still counts as a neighbour), and its n neighbours are the n nearest *other* items.
        normalize: L2-normalise the inputs instead of requiring unit norm.

    Returns:
        float32 ``(Q, D)`` array of unit rows.

    Raises:
        TypeError: non-float inputs, a non-int ``n``, a non-real ``alpha``, a non-bool ``query_vs_rest``.
        ValueError: bad shapes, non-finite or non-unit inputs, dims that disagree, ``n < 0``, ``alpha < 0``,
            or ``query_vs_rest`` with a gallery that is not the queries.
    """
    q = to_embedding_array(queries, 'queries', normalize)
    g = to_embedding_array(gallery, 'gallery', normalize)
    check_same_dim(q, g, 'queries', 'gallery')
    n = check_int(n, 'n', minimum=0)
    alpha = check_real(alpha, 'alpha', 0.0)
    own = self_ids(q, g, query_vs_rest)
    n_eff = min(n, len(g) - int(own is not None))
    scores, ids = top_neighbours(flat_index(g), q, n_eff, own)
    return _expand(q, g, scores, ids, alpha)


def database_augmentation(gallery: ArrayLike, n: int, alpha: float = 0.0, normalize: bool = False) -> np.ndarray:
    """DBA: each gallery vector becomes the weighted average of its top-n gallery neighbours, itself first.

    ``g' = normalise(g + sum_{i <= n - 1} w_i g_i)`` where ``g_1 .. g_{n-1}`` are the ``n - 1`` nearest *other*
    gallery items (by index, so an exact duplicate of g counts as another item) and ``w_i`` as in
    :func:`query_expansion`: g itself is the first of the n neighbours, with weight 1. This equals
    ``query_expansion(gallery, gallery, n - 1, alpha, query_vs_rest=True)``; queries are then searched (or
    expanded) against the augmented gallery.

    Args:
        gallery: ``(G, D)`` L2-normalised embeddings.
        n: Neighbours including the item itself, a positive int (1 returns the gallery unchanged); clamped to
            ``min(n, G)``, so ``n >= G`` averages every item with weights.
        alpha: Exponent of the weights, a real >= 0.
        normalize: L2-normalise the input instead of requiring unit norm.

    Returns:
        float32 ``(G, D)`` array of unit rows.

    Raises:
        TypeError: non-float input, a non-int ``n``, a non-real ``alpha``.
        ValueError: bad shape, non-finite or non-unit rows, ``n < 1``, ``alpha < 0``.
    """
    g = to_embedding_array(gallery, 'gallery', normalize)
    n = check_int(n, 'n')
    alpha = check_real(alpha, 'alpha', 0.0)
    own = np.arange(len(g))
    scores, ids = top_neighbours(flat_index(g), g, min(n, len(g)) - 1, own)
    return _expand(g, g, scores, ids, alpha)


def expansion_weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    """``w = max(s, 0) ** alpha``, or all ones for ``alpha = 0`` (so that 0 ** 0 never decides a weight)."""
    if alpha == 0:
        return np.ones_like(scores, dtype=np.float64)
    return np.maximum(scores.astype(np.float64), 0.0) ** alpha


def _expand(base: np.ndarray, gallery: np.ndarray, scores: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """``normalise(base_i + sum_j w_ij gallery[ids_ij])`` per row, accumulated one neighbour rank at a time so that
    memory stays at two ``(Q, D)`` arrays whatever n is."""
    weights = expansion_weights(scores, alpha)
    total = base.astype(np.float64)
    for j in range(ids.shape[1]):
        total += weights[:, j:j + 1] * gallery[ids[:, j]]
    norms = np.linalg.norm(total, axis=1, keepdims=True)
    # a cancelled sum carries no direction: keep the input vector there rather than divide by ~0
    cancelled = norms[:, 0] <= 1e-6
    total[cancelled] = base[cancelled]
    norms[cancelled] = 1.0
    return np.ascontiguousarray(total / norms, dtype=np.float32)
