"""Retrieval metrics for deep metric learning: Recall@K, Precision@1 and MAP@R, with an exact faiss k-NN search.

Similarity is the inner product of L2-normalised embeddings (the cosine similarity). For a query q with label
y_q, let n_1, n_2, ... be the gallery items ranked by decreasing similarity, rel(i) = [y_{n_i} = y_q], and R the
number of gallery items with label y_q (the query itself not counted). Then, per query,

    Recall@K    = 1 if sum_{i <= K} rel(i) >= 1 else 0       (the DML definition, not |hits| / R)
    Precision@1 = rel(1)                                     (equal to Recall@1)
    AP@R        = (1/R) * sum_{i <= R} P(i) * rel(i),        P(i) = (1/i) * sum_{j <= i} rel(j)

and each metric is the mean over queries (MAP@R: Musgrave, Belongie, Lim, "A Metric Learning Reality Check",
ECCV 2020). Queries with R = 0 have no defined value for any of these: they are left out of every mean and
counted in ``num_queries_without_positive``, which is also what pytorch-metric-learning's AccuracyCalculator does.

Two protocols:

* query-vs-rest (CUB, Cars, SOP): no gallery given; every item queries all other items. The query is removed
  from its own result list by index, never by dropping the first result, because duplicates or ties can rank
  another item at similarity 1 ahead of the query itself.
* query-vs-gallery (In-shop): separate gallery embeddings and labels; nothing is removed.

Memory: faiss (``IndexFlatIP``, exact) ranks ``k_c = max(max(ks), max R') (+1 without a gallery, for the query
itself)`` neighbours per query, ``R' = min(R, max_r)`` and the max taken over the current chunk of queries.
A chunk holds at most ``chunk_size`` queries and at most ``MAX_RESULTS_PER_CALL`` (2^20) results, so peak
memory is the index plus one chunk's results:

    4 * N_gallery * D  +  chunk * (4 * D + ~60 * k_c)  bytes,   chunk * k_c <= 2^20

(~60 bytes per result: faiss's float32 score and int64 id, then the neighbour labels, relevance mask and the
AP@R cumulative sums; at most ~63 MB: 1047 queries per call at k_c 1001, 4096 queries and ~5 MB at k_c 20),
on top of a 600 MB index for 100k x 1536, which faiss holds as its own copy of the gallery).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..utils.checks import check_bool, check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import as_labels as _as_labels
from .clustering import normalized_mutual_info
from .faiss_import import faiss

__all__ = ['evaluate_retrieval', 'DEFAULT_KS', 'SOP_KS', 'INSHOP_KS', 'DEFAULT_CHUNK_SIZE', 'DEFAULT_MAX_R',
           'MAX_RESULTS_PER_CALL']

#: Recall@K cut-offs reported for CUB-200-2011 and Cars196.
DEFAULT_KS = (1, 2, 4, 8)
#: Recall@K cut-offs reported for Stanford Online Products.
SOP_KS = (1, 10, 100, 1000)
#: Recall@K cut-offs reported for In-shop Clothes Retrieval.
INSHOP_KS = (1, 10, 20, 30, 40, 50)
#: Queries searched per faiss call; see :func:`evaluate_retrieval` for the memory this bounds. faiss multiplies
#: blocks of 4096 queries, so fewer per call leaves its matrix products smaller (about 10% slower at 20k x 512).
DEFAULT_CHUNK_SIZE = 4096
#: Most results (queries x neighbours) per faiss call: caps a chunk's memory at ~60 MB when R is large.
MAX_RESULTS_PER_CALL = 1 << 20
#: Largest R used for AP@R. Class sizes of the usual benchmarks stay far below (SOP <= 12, In-shop <= ~160, CUB
#: ~60, Cars ~100; a class of 800 images gives R = 799), while an unbounded R for a huge class (e.g. 2 classes of
#: 50k) would make every query retrieve 50k neighbours.
DEFAULT_MAX_R = 1000


def _check_ks(ks: Any) -> Tuple[int, ...]:
    if isinstance(ks, (int, np.integer)) or not isinstance(ks, (Sequence, np.ndarray)) or len(ks) == 0:
        raise TypeError(f'ks must be a non-empty sequence of positive ints, got {ks!r}')
    for k in ks:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f'ks must contain positive ints only, got {type(k).__name__} {k!r} in {ks!r}')
        if k < 1:
            raise ValueError(f'ks must contain positive ints only, got {k!r} in {ks!r}')
    return tuple(sorted({int(k) for k in ks}))


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, int]:
    """Map both label arrays onto shared class codes ``0 .. C-1``."""
    numeric = 'iub'
    if (query_labels.dtype.kind in numeric) != (gallery_labels.dtype.kind in numeric):
        # numpy would cast ints to strings on concatenation and silently match 1 with '1'
        raise TypeError(
            f'labels and gallery_labels must both be ints or both be strs, got dtypes {query_labels.dtype} '
            f'and {gallery_labels.dtype}'
        )
    if {query_labels.dtype.kind, gallery_labels.dtype.kind} == {'i', 'u'}:
        # numpy promotes int64 + uint64 to float64, which merges labels >= 2**53: compare as int64
        for arr, name in ((query_labels, 'labels'), (gallery_labels, 'gallery_labels')):
            if arr.dtype.kind == 'u' and len(arr) and arr.max() > np.iinfo(np.int64).max:
                raise ValueError(f'{name} holds unsigned labels above the int64 range; pass both as one dtype')
        query_labels, gallery_labels = query_labels.astype(np.int64), gallery_labels.astype(np.int64)
    _, codes = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes[:len(query_labels)], codes[len(query_labels):], int(codes.max()) + 1


def _scores(relevant_rows: Iterator[Tuple[np.ndarray, np.ndarray]], ks: Tuple[int, ...],
            r_used: np.ndarray) -> Dict[str, float]:
    """Recall@K, precision@1 and MAP@R averaged over the chunks of (query rows, relevance of their ranks)."""
    hits: Dict[int, list] = {k: [] for k in ks}
    top1_correct, average_precision = [], []
    for rows, relevant in relevant_rows:
        for k in ks:
            hits[k].append(relevant[:, :k].any(axis=1))
        top1_correct.append(relevant[:, 0])
        average_precision.append(_average_precision_at_r(relevant, r_used[rows]))
    results: Dict[str, float] = {f'recall@{k}': float(np.concatenate(hits[k]).mean()) for k in ks}
    results['precision@1'] = float(np.concatenate(top1_correct).mean())
    results['map@r'] = float(np.concatenate(average_precision).mean())
    return results


def evaluate_retrieval(
    embeddings: ArrayLike,
    labels: Any,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_embeddings: Optional[ArrayLike] = None,
    gallery_labels: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_r: Optional[int] = DEFAULT_MAX_R,
    normalize: bool = False,
    nmi: bool = False,
) -> Dict[str, float]:
    """Recall@K, Precision@1 and MAP@R (see the module docstring) by exact inner-product search.

    Without a gallery, every item is a query against all other items (query-vs-rest, itself excluded by index);
    with ``gallery_embeddings``/``gallery_labels``, the ``embeddings`` are queries against that gallery
    (query-vs-gallery) and nothing is excluded.

    Peak memory is the gallery plus one chunk of results (the module docstring gives the arithmetic). Queries with
    R = 0 are not searched at all. Ties in similarity are ranked in faiss's order; metrics that depend on the order
    of exactly tied items with different labels are ambiguous under any k-NN evaluation.

    Args:
        embeddings: ``(N, D)`` float tensor or array of L2-normalised query embeddings (also the gallery when no
            gallery is given).
        labels: ``N`` class labels (ints or strs; tensor, array or sequence).
        ks: Cut-offs K for Recall@K, positive ints (duplicates are merged). Each K must be at most the number of
            gallery items a query ranks (``N - 1`` without a gallery, ``N_gallery`` with one); a larger K raises
            instead of being clipped, since Recall@K at a clipped K would be reported under the wrong name.
        gallery_embeddings: Optional ``(N_gallery, D)`` gallery; requires ``gallery_labels``.
        gallery_labels: ``N_gallery`` gallery labels, of the same kind (int or str) as ``labels``.
        chunk_size: Most queries per faiss search call; bounds the memory as above. Results do not depend on it.
        max_r: Cap on R for AP@R. A query with R > max_r is scored with ``R' = max_r`` in the AP@R formula (its
            precision over the first ``max_r`` ranks, an approximation of AP@R) and counted in
            ``num_queries_r_capped``. None = no cap (exact MAP@R for any class size).
        normalize: L2-normalise the embeddings instead of requiring unit norm (|norm - 1| <= 1e-2).
        nmi: Also report ``'nmi'``: :func:`cgd_heads.retrieval.clustering.normalized_mutual_info` of the
            ``embeddings`` (the queries; the gallery is not clustered) and ``labels``, with k = their number of
            classes and seed 0. Off by default: k-means costs more than the search on large sets.

    Returns:
        ``{'recall@K': ... for each K, 'precision@1', 'map@r'}`` as floats in [0, 1], plus the ints
        ``num_queries`` (queries averaged over, i.e. with R >= 1), ``num_queries_without_positive`` (queries with
        R = 0, left out), ``num_gallery`` (gallery size: N without a gallery) and ``num_queries_r_capped``;
        with ``nmi=True`` also ``'nmi'``, a float in [0, 1].

    Raises:
        TypeError: wrong argument types (non-float embeddings, float labels, int/str label mix).
        ValueError: empty or mis-shaped input, non-finite or non-unit embeddings, dims or lengths that
            disagree, a K larger than the ranked gallery, or no query with any same-class gallery item.
    """
    nmi = check_bool(nmi, 'nmi')
    queries, query_labels, gallery, gallery_label_arr, ks, chunk_size, max_r = check_inputs(
        embeddings, labels, ks, gallery_embeddings, gallery_labels, chunk_size, max_r, normalize)
    protocol = retrieval_protocol(query_labels, gallery_label_arr, ks, max_r, gallery_embeddings is None)
    results = search_metrics(queries, gallery, protocol, chunk_size)
    if nmi:
        results['nmi'] = normalized_mutual_info(queries, query_labels)
    return results


def check_inputs(embeddings: ArrayLike, labels: Any, ks: Any, gallery_embeddings: Optional[ArrayLike],
                 gallery_labels: Any, chunk_size: Any, max_r: Any, normalize: bool) -> Tuple[Any, ...]:
    """The arguments of :func:`evaluate_retrieval`, checked: ``(queries, query_labels, gallery, gallery_labels, ks,
    chunk_size, max_r)``, the gallery being the queries themselves (query-vs-rest) when none is given."""
    queries = to_embedding_array(embeddings, 'embeddings', normalize)
    query_labels = _as_labels(labels, len(queries), 'labels')
    ks = _check_ks(ks)
    chunk_size = check_int(chunk_size, 'chunk_size')
    max_r = check_int(max_r, 'max_r', allow_none=True)
    gallery, gallery_label_arr = _gallery(queries, query_labels, gallery_embeddings, gallery_labels, normalize)
    return queries, query_labels, gallery, gallery_label_arr, ks, chunk_size, max_r


class Protocol(NamedTuple):
    """What the metrics of one evaluation need besides the ranking: class codes, R per query, and which queries
    are averaged over (R >= 1)."""
    ks: Tuple[int, ...]
    query_codes: np.ndarray
    gallery_codes: np.ndarray
    r: np.ndarray  # same-class gallery items per query (itself not counted)
    r_used: np.ndarray  # R' = min(R, max_r)
    evaluated: np.ndarray  # query rows with R >= 1
    exclude_self: bool

    @property
    def list_length(self) -> int:
        """Ranks every evaluated query must have for the metrics: ``max(max(ks), max R')``."""
        return max(self.ks[-1], int(self.r_used[self.evaluated].max()))


def retrieval_protocol(query_labels: np.ndarray, gallery_labels: np.ndarray, ks: Tuple[int, ...],
                       max_r: Optional[int], exclude_self: bool) -> Protocol:
    """Check the largest K against the items a query ranks and count R per query; ``exclude_self``: query-vs-rest
    (query i is gallery item i, never ranked for itself)."""
    ranked = len(gallery_labels) - int(exclude_self)  # gallery items each query ranks
    if ks[-1] > ranked:
        where = 'N - 1 other items (query-vs-rest)' if exclude_self else 'gallery items'
        raise ValueError(f'ks must not exceed the {ranked} {where}, got K={ks[-1]} in ks={ks}')
    query_codes, gallery_codes, r = _class_counts(query_labels, gallery_labels, exclude_self)
    r_used = r if max_r is None else np.minimum(r, max_r)
    return Protocol(ks, query_codes, gallery_codes, r, r_used, np.flatnonzero(r > 0), exclude_self)


def search_metrics(queries: np.ndarray, gallery: np.ndarray, protocol: Protocol, chunk_size: int) -> Dict[str, Any]:
    """The metric dict of :func:`evaluate_retrieval` from an exact faiss search of ``queries`` against
    ``gallery`` (checked arrays); with ``protocol.exclude_self`` query i never ranks gallery item i, whether or not
    the two vectors are equal (e.g. an expanded query against the collection it came from)."""
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    relevant_rows = _relevance_chunks(index, queries, protocol.query_codes, protocol.gallery_codes,
                                      protocol.evaluated, protocol.r_used, protocol.ks, chunk_size,
                                      protocol.exclude_self)
    return metrics_from_relevance(relevant_rows, protocol, len(gallery))


def ranking_metrics(ids: np.ndarray, protocol: Protocol) -> Dict[str, Any]:
    """The metric dict of :func:`evaluate_retrieval` from ranked gallery ids: ``ids[i]`` the gallery items of query
    i, best first, with at least ``protocol.list_length`` columns (rows of unevaluated queries are not read)."""
    length = protocol.list_length
    if ids.ndim != 2 or ids.shape[1] < length:
        raise ValueError(f'ids must have at least {length} columns (max K and the largest R), got shape {ids.shape}')
    step = max(1, MAX_RESULTS_PER_CALL // length)

    def chunks() -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(protocol.evaluated), step):
            rows = protocol.evaluated[start:start + step]
            yield rows, protocol.gallery_codes[ids[rows, :length]] == protocol.query_codes[rows][:, None]

    return metrics_from_relevance(chunks(), protocol, len(protocol.gallery_codes))


def metrics_from_relevance(relevant_rows: Iterator[Tuple[np.ndarray, np.ndarray]], protocol: Protocol,
                           num_gallery: int) -> Dict[str, Any]:
    """Recall@K, precision@1, MAP@R and the counts of :func:`evaluate_retrieval` from chunks of (evaluated query
    rows, rel(i) over their first ranks, at least ``max(K, R')`` columns)."""
    evaluated, r, r_used = protocol.evaluated, protocol.r, protocol.r_used
    results: Dict[str, Any] = _scores(relevant_rows, protocol.ks, r_used)
    results['num_queries'] = int(len(evaluated))
    results['num_queries_without_positive'] = int(len(r) - len(evaluated))
    results['num_gallery'] = int(num_gallery)
    results['num_queries_r_capped'] = int((r[evaluated] > r_used[evaluated]).sum())
    return results


def _class_counts(query_labels: np.ndarray, gallery_labels: np.ndarray,
                  exclude_self: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared class codes of queries and gallery, and R (same-class gallery items) per query."""
    query_codes, gallery_codes, num_classes = _encode_labels(query_labels, gallery_labels)
    r = np.bincount(gallery_codes, minlength=num_classes)[query_codes] - int(exclude_self)
    if not (r > 0).any():
        raise ValueError(
            'no query has a same-class item in the gallery (every R = 0), so no metric is defined; check that '
            'labels and gallery_labels share classes'
        )
    return query_codes, gallery_codes, r


def _gallery(queries: np.ndarray, query_labels: np.ndarray, gallery_embeddings: Optional[ArrayLike],
             gallery_labels: Any, normalize: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The gallery and its labels: the queries themselves (query-vs-rest) or the given ones, checked."""
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(
            'gallery_embeddings and gallery_labels must be given together (query-vs-gallery) or both be None '
            f'(query-vs-rest), got gallery_embeddings {"None" if gallery_embeddings is None else "set"} and '
            f'gallery_labels {"None" if gallery_labels is None else "set"}'
        )
    if gallery_embeddings is None:
        return queries, query_labels
    gallery = to_embedding_array(gallery_embeddings, 'gallery_embeddings', normalize)
    gallery_label_arr = _as_labels(gallery_labels, len(gallery), 'gallery_labels')
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(
            f'gallery_embeddings must have the same dim as embeddings ({queries.shape[1]}), got shape '
            f'{gallery.shape}'
        )
    return gallery, gallery_label_arr


def _relevance_chunks(index: Any, queries: np.ndarray, query_codes: np.ndarray, gallery_codes: np.ndarray,
                      evaluated: np.ndarray, r_used: np.ndarray, ks: Tuple[int, ...], chunk_size: int,
                      exclude_self: bool) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Per chunk of evaluated queries: (their rows, rel(i) over the first max(K, R') ranks), at most
    ``chunk_size`` queries and ``MAX_RESULTS_PER_CALL`` results per faiss call."""
    step = min(chunk_size, max(1, MAX_RESULTS_PER_CALL // (max(ks[-1], int(r_used[evaluated].max())) + 1)))
    for start in range(0, len(evaluated), step):
        rows = evaluated[start:start + step]
        k_cols = max(ks[-1], int(r_used[rows].max()))
        ids = _search_neighbours(index, queries[rows], rows if exclude_self else None, k_cols)
        yield rows, gallery_codes[ids] == query_codes[rows][:, None]  # (chunk, k_cols) rel(i)


def _search_neighbours(index: Any, queries: np.ndarray, self_ids: Optional[np.ndarray], k: int) -> np.ndarray:
    """Ids of the top-``k`` gallery items per query, with each query's own id removed when ``self_ids`` is given.

    With self-exclusion ``k + 1`` items are searched and the query's own id is dropped wherever it occurs; if it
    is not among them (more than ``k`` exact duplicates tie with it), the last column is dropped instead.
    """
    if self_ids is None:
        _, ids = index.search(queries, k)
    else:
        _, ids = index.search(queries, k + 1)
        is_self = ids == self_ids[:, None]
        is_self[~is_self.any(axis=1), -1] = True
        ids = ids[~is_self].reshape(len(queries), k)
    if (ids < 0).any():
        # IndexFlatIP returns k valid ids whenever k <= ntotal and the inputs are finite, both checked above
        raise RuntimeError(f'faiss returned fewer than k={k} neighbours for some query; this is a bug')
    return ids


def _average_precision_at_r(relevant: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R = (1/R) * sum_{i <= R} P(i) * rel(i) per row, for ``relevant`` with at least ``max(r)`` columns."""
    ranks = np.arange(1, relevant.shape[1] + 1)
    within_r = relevant & (ranks[None, :] <= r[:, None])
    precision = np.cumsum(within_r, axis=1) / ranks[None, :]
    return (precision * within_r).sum(axis=1) / r

