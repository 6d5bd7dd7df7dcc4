"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking person re-identification with k-reciprocal
encoding", CVPR 2017), exact over a full distance matrix or from a faiss k-NN graph.

Items are the queries followed by the gallery (N = Q + G), or only the gallery in query-vs-rest mode (N = G, the
queries being the gallery). For L2-normalised x:

    d(i, j)   = ||x_i - x_j||^2 = 2 - 2 <x_i, x_j>                      original distance
    d'(i, j)  = d(i, j) / max_k d(i, k)                                 row-normalised (a zero row stays zero)
    N(p, k)   = p followed by its k nearest other items under d'         (k + 1 items, p first by index)
    R(p, k)   = {g in N(p, k) : p in N(g, k)}                           k-reciprocal set
    R*(p, k1) = R(p, k1) u R(c, h)   for every c in R(p, k1) with
                3 |R(c, h) n R(p, k1)| > 2 |R(c, h)|,   h = round(k1 / 2) (half to even, as numpy.around)
    V(p, g)   = exp(-d'(p, g)) / sum_{g' in R*(p)} exp(-d'(p, g'))  for g in R*(p), else 0
    V_qe(p)   = (1 / |N_2|) sum_{j in N_2} V(j),  N_2 = the first k2 items of N(p, .)   (skipped when k2 = 1)
    d_J(p, g) = 1 - sum_j min(V_qe(p, j), V_qe(g, j)) / sum_j max(V_qe(p, j), V_qe(g, j))
    final     = (1 - lambda) d_J(p, g) + lambda d'(p, g)

This follows the authors' reference implementation where it is more specific than the paper: the distance is the
squared Euclidean one; it is normalised by its maximum (the reference divides every column by its maximum and
transposes; d is symmetric, so that is the row maximum above); the expansion test compares with the original
R(p, k1) and is strict; V rows are normalised to sum 1 and N(p, k) includes p. One difference: ties among equal
distances are broken with p first, then by lower index (the reference's quicksort leaves them unspecified).
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Tuple

import numpy as np
import scipy.sparse

from ..utils.checks import check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import check_real, check_same_dim, self_ids
from .neighbours import flat_index, top_neighbours

__all__ = ['k_reciprocal_rerank_dense', 'k_reciprocal_rerank_sparse']

# Elements of the largest temporary array built per chunk (about 32 MB of int64), bounding the sparse version's
# memory beyond its O(N * (K + nnz(V))) graph and weights.
_CHUNK_ELEMENTS = 1 << 22


def k_reciprocal_rerank_dense(queries: ArrayLike, gallery: ArrayLike, k1: int = 20, k2: int = 6,
                              lambda_value: float = 0.3, query_vs_rest: bool = False,
                              normalize: bool = False) -> np.ndarray:
    """Exact k-reciprocal re-ranking over the full ``N x N`` distance matrix (see the module docstring).

    Time O(N^3) (matrix products of 0/1 matrices for the expansion) and memory O(N^2) float64: meant for a few
    thousand items and as the reference for :func:`k_reciprocal_rerank_sparse`.

    Args:
        queries: ``(Q, D)`` L2-normalised query embeddings.
        gallery: ``(G, D)`` L2-normalised gallery embeddings.
        k1: k of the k-reciprocal sets, a positive int (20 in the paper).
        k2: Neighbours averaged in the local query expansion, a positive int (6 in the paper; 1 = none).
        lambda_value: Weight of the original distance, a real in ``[0, 1]`` (0.3 in the paper).
        query_vs_rest: The gallery IS the queries (checked): items are the G gallery vectors once (not twice),
            and the returned diagonal is ``inf`` so that no query ranks itself.
        normalize: L2-normalise the inputs instead of requiring unit norm.

    Returns:
        float64 ``(Q, G)`` final distances (smaller = more similar); ``argsort(axis=1, kind='stable')`` ranks.

    Raises:
        TypeError: non-float embeddings, non-int ``k1``/``k2``, a non-real ``lambda_value``, a non-bool
            ``query_vs_rest``.
        ValueError: bad shapes, non-finite or non-unit rows, dims that disagree, ``k1`` or ``k2`` < 1,
            ``lambda_value`` outside ``[0, 1]``, ``query_vs_rest`` with a gallery that is not the queries.
    """
    q, g, own, k1, k2, lambda_value = _check_inputs(queries, gallery, k1, k2, lambda_value, query_vs_rest, normalize)
    items = g if own is not None else np.concatenate([q, g])
    x = items.astype(np.float64)
    dist = np.maximum(2.0 - 2.0 * (x @ x.T), 0.0)
    row_max = dist.max(axis=1, keepdims=True)
    dist /= np.where(row_max > 0, row_max, 1.0)
    ranked = dist.copy()
    np.fill_diagonal(ranked, -1.0)  # p first even when a duplicate is at distance 0 too
    rank = np.argsort(ranked, axis=1, kind='stable')
    v = _dense_weights(dist, rank, k1)
    if k2 > 1:
        v = v[rank[:, :k2]].mean(axis=1)
    offset = 0 if own is not None else len(q)
    query_rows, gallery_rows = np.arange(len(q)), np.arange(offset, offset + len(g))
    vg = v[gallery_rows]
    jaccard = np.empty((len(q), len(g)))
    for a, p in enumerate(query_rows):
        jaccard[a] = 1.0 - np.minimum(v[p], vg).sum(axis=1) / np.maximum(v[p], vg).sum(axis=1)
    final = (1.0 - lambda_value) * jaccard + lambda_value * dist[np.ix_(query_rows, gallery_rows)]
    if own is not None:
        np.fill_diagonal(final, np.inf)
    return final


def _dense_reciprocal(rank: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``(N, N)`` matrix of ``g in R(p, k)``: ``g in N(p, k)`` and ``p in N(g, k)``."""
    forward = np.zeros(rank.shape, dtype=bool)
    np.put_along_axis(forward, rank[:, :k + 1], True, axis=1)
    return forward & forward.T


def _dense_weights(dist: np.ndarray, rank: np.ndarray, k1: int) -> np.ndarray:
    """``V``: Gaussian-kernel weights over ``R*(p, k1)``, rows summing to 1."""
    r1 = _dense_reciprocal(rank, k1)
    half = _dense_reciprocal(rank, int(round(k1 / 2)))
    # overlap[c, p] = |R(c, h) n R(p, k1)|; float32 products of 0/1 matrices count exactly below 2^24
    overlap = half.astype(np.float32) @ r1.T.astype(np.float32)
    accept = r1.T & (3 * overlap > 2 * half.sum(axis=1)[:, None])  # accept[c, p]: add R(c, h) to R*(p)
    expanded = r1 | (accept.T.astype(np.float32) @ half.astype(np.float32) > 0)
    weights = np.where(expanded, np.exp(-dist), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def k_reciprocal_rerank_sparse(queries: ArrayLike, gallery: ArrayLike, k1: int = 20, k2: int = 6,
                               lambda_value: float = 0.3, num_neighbors: Optional[int] = None,
                               top: Optional[int] = None, query_vs_rest: bool = False,
                               normalize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking from a faiss top-K neighbour graph: the ``top`` best gallery items per query.

    Every quantity of the module docstring is computed as in :func:`k_reciprocal_rerank_dense`, but only where it
    is needed: N(p, k1), N(c, h) and N_2 come from the K-NN graph (K >= max(k1 + 1, k2) suffices for them);
    d' of any pair is computed from the two vectors, and the row maximum of d from the farthest item, found by
    a faiss search for ``-x`` (so no distance is approximated or treated as infinite). Where it departs from
    the dense version:

    * Only candidates are ranked: the gallery items sharing a non-zero column of V_qe with the query (d_J < 1)
      plus the query's T nearest gallery items by d, ``T = min(max(top, K), G')``. Any other item has d_J = 1
      and ``d' >= d'_T`` (the T-th nearest), so its final distance is at least
      ``bound = (1 - lambda) + lambda d'_T``, while the T >= top nearest have final distances at most ``bound``.
      The returned list is therefore the dense top-``top`` list, with the same distances, except that items
      tied *exactly* at ``bound`` may be chosen differently: with ``lambda = 0`` every non-candidate has final
      distance exactly 1, and the dense ranking orders those by id while this one returns candidates only.
    * Which items make an item's K-NN list is decided by faiss's float32 inner products (the list is then
      re-sorted by float64 distance, ties by lower id, the item itself first, as the dense ranking): items tied,
      or within float32 rounding of a tie, at the K-th place may be chosen differently from the dense ranking.
    * The row maximum of d is the float64 distance to the item faiss finds farthest in float32; a near-tie for
      the farthest item changes d' by float32 rounding (~1e-7 relative) at most.
    * ``sum max = 2 - sum min``, as V_qe rows sum to 1 (the dense version sums the maxima).

    Memory: O(N K) for the graph, O(nnz(V_qe)) for the weights (at most N k2 |R*|), plus chunks of about
    ``2^22`` elements. Time: the exact faiss searches (O(N^2 D)), O(N k1^2 h) for the sets, and per query the
    products of its V_qe row with the columns it touches.

    Args:
        queries: ``(Q, D)`` L2-normalised query embeddings.
        gallery: ``(G, D)`` L2-normalised gallery embeddings.
        k1: k of the k-reciprocal sets, a positive int.
        k2: Neighbours averaged in the local query expansion, a positive int (1 = none).
        lambda_value: Weight of the original distance, a real in ``[0, 1]``.
        num_neighbors: K, graph neighbours per item including itself, an int >= max(k1 + 1, k2) (None = that
            value); clamped to N.
        top: Length of each returned list, ``1 <= top <= G'`` with ``G' = G`` (``G - 1`` query-vs-rest); pass at
            least what the evaluation reads (e.g. the largest class size for MAP@R). None = ``min(K, G')``.
        query_vs_rest: The gallery IS the queries (checked): items are the G gallery vectors once, and a query
            never appears in its own list (excluded by index; its exact duplicates are ranked).
        normalize: L2-normalise the inputs instead of requiring unit norm.

    Returns:
        ``(ids, distances)``: int64 gallery ids and their float64 final distances, both ``(Q, top)``, by
        increasing distance (ties by lower id).

    Raises:
        TypeError: as the dense version, or a non-int ``num_neighbors``/``top``.
        ValueError: as the dense version; ``num_neighbors`` below ``max(k1 + 1, k2)``; ``top`` outside
            ``[1, G']``; a query-vs-rest gallery of one item (nothing to rank).
    """
    q, g, own, k1, k2, lambda_value = _check_inputs(queries, gallery, k1, k2, lambda_value, query_vs_rest, normalize)
    items = g if own is not None else np.concatenate([q, g])
    depth, top, t = _check_sizes(len(items), len(g) - int(own is not None), k1, k2, num_neighbors, top)
    index = flat_index(items)
    rank = _neighbour_graph(index, items, depth)
    farthest = index.search(-items, 1)[1][:, 0]
    row_max = _pair_distances(items, np.arange(len(items)), farthest)
    row_max[row_max == 0] = 1.0
    v = _sparse_weights(items, rank, row_max, k1)
    if k2 > 1:
        n2 = rank[:, :k2]
        rows = np.repeat(np.arange(len(items)), n2.shape[1])
        average = scipy.sparse.csr_matrix((np.full(rows.size, 1.0 / n2.shape[1]), (rows, n2.ravel())),
                                          shape=v.shape)
        v = (average @ v).tocsr()
    _, nearest = top_neighbours(index if own is not None else flat_index(g), q, t, own)
    context = _Context(items, v, v.tocsc(), row_max, 0 if own is not None else len(q), len(g), own is not None,
                       lambda_value)
    ids, distances = np.empty((len(q), top), np.int64), np.empty((len(q), top))
    for rows in _query_chunks(context, len(q), t):
        ids[rows], distances[rows] = _rank_chunk(rows, nearest[rows], top, context)
    return ids, distances


class _Context(NamedTuple):
    """What every chunk of queries needs: the items, V_qe by rows and by columns, and the constants."""
    items: np.ndarray
    v: scipy.sparse.csr_matrix
    v_csc: scipy.sparse.csc_matrix
    row_max: np.ndarray
    offset: int  # item id of gallery item 0
    n_gallery: int
    exclude_self: bool
    lambda_value: float


def _query_chunks(context: _Context, n_queries: int, t: int) -> Iterator[np.ndarray]:
    """Consecutive query ids in chunks of about ``_CHUNK_ELEMENTS`` (query, item, min) triples each: a query
    makes one per non-zero of its V_qe row times the non-zeros of that column, plus its T neighbours."""
    pattern = context.v[:n_queries].copy()
    pattern.data[:] = 1.0
    work = pattern @ np.diff(context.v_csc.indptr).astype(np.float64) + t
    done = np.cumsum(work)
    start = 0
    while start < n_queries:
        before = done[start - 1] if start else 0.0
        end = max(start + 1, int(np.searchsorted(done, before + _CHUNK_ELEMENTS, side='right')))
        yield np.arange(start, end)
        start = end


def _check_inputs(queries: ArrayLike, gallery: ArrayLike, k1: int, k2: int, lambda_value: float,
                  query_vs_rest: bool, normalize: bool) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray],
                                                                 int, int, float]:
    q = to_embedding_array(queries, 'queries', normalize)
    g = to_embedding_array(gallery, 'gallery', normalize)
    check_same_dim(q, g, 'queries', 'gallery')
    own = self_ids(q, g, query_vs_rest)
    return q, g, own, check_int(k1, 'k1'), check_int(k2, 'k2'), check_real(lambda_value, 'lambda_value', 0.0, 1.0)


def _check_sizes(n_items: int, available: int, k1: int, k2: int, num_neighbors: Optional[int],
                 top: Optional[int]) -> Tuple[int, int, int]:
    """``(K, top, T)``: graph depth, list length and candidate neighbours per query, checked and clamped."""
    needed = max(k1 + 1, k2)
    depth = check_int(num_neighbors, 'num_neighbors', allow_none=True)
    if depth is not None and depth < needed:
        raise ValueError(f'num_neighbors must be >= max(k1 + 1, k2) = {needed} (or None), got {depth}')
    depth = min(needed if depth is None else depth, n_items)
    if available < 1:
        raise ValueError('the gallery must hold at least one item a query can rank (2 or more with '
                         'query_vs_rest=True), got none')
    top = check_int(top, 'top', allow_none=True)
    if top is not None and top > available:
        raise ValueError(f'top must be at most the {available} gallery items a query ranks, got {top}')
    top = min(depth, available) if top is None else top
    return depth, top, min(max(top, depth), available)


def _neighbour_graph(index: Any, items: np.ndarray, depth: int) -> np.ndarray:
    """``(N, K)`` ids: each item first, then its ``K - 1`` nearest other items from faiss, re-sorted by float64
    distance with ties by lower id, so that the order matches the dense version's stable argsort."""
    _, rank = top_neighbours(index, items, depth, np.arange(len(items)), keep_self=True)
    if depth > 2:
        others = rank[:, 1:]
        dist = _pair_distances(items, np.repeat(np.arange(len(items)), depth - 1), others.ravel())
        order = np.lexsort((others, dist.reshape(others.shape)), axis=-1)
        rank[:, 1:] = np.take_along_axis(others, order, axis=1)
    return rank


def _pair_distances(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``d(a_i, b_i) = max(2 - 2 <x_a, x_b>, 0)`` in float64, in chunks of rows."""
    out = np.empty(len(a))
    step = max(1, _CHUNK_ELEMENTS // x.shape[1])
    for s in range(0, len(a), step):
        xa, xb = x[a[s:s + step]].astype(np.float64), x[b[s:s + step]].astype(np.float64)
        out[s:s + step] = np.maximum(2.0 - 2.0 * np.einsum('ij,ij->i', xa, xb), 0.0)
    return out


def _reciprocal_mask(rank: np.ndarray, k: int) -> np.ndarray:
    """``mask[p, i] = rank[p, i] in R(p, k)`` over the first ``k + 1`` columns: p is in the neighbour's list."""
    width = min(k + 1, rank.shape[1])
    mask = np.empty((len(rank), width), dtype=bool)
    step = max(1, _CHUNK_ELEMENTS // (width * width))
    for s in range(0, len(rank), step):
        rows = np.arange(s, min(s + step, len(rank)))
        forward = rank[rows, :width]
        mask[rows] = (rank[forward, :width] == rows[:, None, None]).any(axis=2)
    return mask


def _sparse_weights(x: np.ndarray, rank: np.ndarray, row_max: np.ndarray, k1: int) -> scipy.sparse.csr_matrix:
    """``V`` as a sparse ``(N, N)`` matrix: Gaussian-kernel weights over ``R*(p, k1)``, rows summing to 1."""
    n = len(rank)
    r1, half = _reciprocal_mask(rank, k1), _reciprocal_mask(rank, int(round(k1 / 2)))
    a, b = r1.shape[1], half.shape[1]
    pairs = [np.nonzero(r1)[0] * n + rank[:, :a][r1]]  # R(p, k1) itself, keyed p * N + g
    step = max(1, _CHUNK_ELEMENTS // (a * b * a))
    for s in range(0, n, step):
        rows = np.arange(s, min(s + step, n))
        forward, in_r1 = rank[rows, :a], r1[rows]
        cand, cand_mask = rank[forward, :b], half[forward]  # (B, a, b): R(c, h) for each c in N(p, k1)
        in_both = ((cand[..., None] == forward[:, None, None, :]) & in_r1[:, None, None, :]).any(axis=3) & cand_mask
        accept = in_r1 & (3 * in_both.sum(axis=2) > 2 * cand_mask.sum(axis=2))
        added = accept[..., None] & cand_mask
        pairs.append(rows[np.nonzero(added)[0]] * n + cand[added])
    keys = np.unique(np.concatenate(pairs))
    p, g = keys // n, keys % n
    weights = np.exp(-_pair_distances(x, p, g) / row_max[p])
    weights /= np.bincount(p, weights=weights, minlength=n)[p]
    return scipy.sparse.csr_matrix((weights, (p, g)), shape=(n, n))


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(owner, position)`` of every element of the concatenated ranges ``[start_i, start_i + length_i)``."""
    owner = np.repeat(np.arange(len(starts)), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, starts[owner] + np.arange(len(owner)) - first


def _candidates(rows: np.ndarray, nearest: np.ndarray,
                context: _Context) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(query, gallery id, sum_j min(V_qe(q, j), V_qe(g, j)), is one of the T nearest)`` for every candidate
    pair of the queries ``rows`` (chunk-local query index; item id of query i is i in both modes)."""
    v, v_csc, offset, n_gallery = context.v, context.v_csc, context.offset, context.n_gallery
    owner, pos = _ranges(v.indptr[rows], np.diff(v.indptr)[rows])
    cols, vals = v.indices[pos], v.data[pos]
    who, pos2 = _ranges(v_csc.indptr[cols], np.diff(v_csc.indptr)[cols])
    query, other = owner[who], v_csc.indices[pos2]
    smin = np.minimum(vals[who], v_csc.data[pos2])
    keep = (other >= offset) & (other < offset + n_gallery)
    if context.exclude_self:
        keep &= other != rows[query]
    overlapping = query[keep] * n_gallery + other[keep] - offset
    keys = np.concatenate([overlapping, np.repeat(np.arange(len(rows)), nearest.shape[1]) * n_gallery
                           + nearest.ravel()])
    keys, inverse = np.unique(keys, return_inverse=True)
    inverse = inverse.reshape(-1)
    smin = np.bincount(inverse, weights=np.concatenate([smin[keep], np.zeros(nearest.size)]), minlength=len(keys))
    is_near = np.bincount(inverse[len(overlapping):], minlength=len(keys)) > 0
    return keys // n_gallery, keys % n_gallery, smin, is_near


def _rank_chunk(rows: np.ndarray, nearest: np.ndarray, top: int,
                context: _Context) -> Tuple[np.ndarray, np.ndarray]:
    """Ids and final distances of the ``top`` best candidates of the queries ``rows``.

    The T nearest are scored first; the ``top``-th smallest of their final distances, ``upper``, bounds the
    list. Another candidate has ``d' >= d'_T`` (the largest d' of the T nearest), so its final distance is at
    least ``(1 - lambda) d_J + lambda d'_T``; those whose bound exceeds ``upper`` cannot enter the list and are
    never scored (most overlaps are tiny, so this skips most of the vector products).
    """
    query, gal, smin, is_near = _candidates(rows, nearest, context)
    lam = context.lambda_value
    jaccard = 1.0 - smin / (2.0 - smin)
    final = np.full(len(query), np.inf)
    near = np.flatnonzero(is_near)
    original = _pair_distances(context.items, rows[query[near]], gal[near] + context.offset)
    final[near] = (1.0 - lam) * jaccard[near] + lam * original / context.row_max[rows[query[near]]]
    d_t = np.zeros(len(rows))
    np.maximum.at(d_t, query[near], original / context.row_max[rows[query[near]]])
    by_query = near[np.lexsort((final[near], query[near]))]  # exactly T per query, in order
    upper = final[by_query].reshape(len(rows), -1)[:, top - 1]
    # slack for float32 rounding: the T nearest were chosen by faiss's float32 scores, d' is float64
    maybe = np.flatnonzero(~is_near & ((1.0 - lam) * jaccard + lam * d_t[query] <= upper[query] + 1e-6))
    original = _pair_distances(context.items, rows[query[maybe]], gal[maybe] + context.offset)
    final[maybe] = (1.0 - lam) * jaccard[maybe] + lam * original / context.row_max[rows[query[maybe]]]
    scored = np.concatenate([near, maybe])
    order = scored[np.lexsort((gal[scored], final[scored], query[scored]))]
    counts = np.bincount(query[order], minlength=len(rows))
    take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(top)]
    return gal[take], final[take]
