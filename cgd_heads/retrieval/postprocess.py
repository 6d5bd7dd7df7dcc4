"""Retrieval post-processing as one composable pipeline, and its evaluation with the metrics of
:func:`~cgd_heads.retrieval.metrics.evaluate_retrieval`.

A :class:`PostProcess` applies, in this order:

1. whitening (:meth:`Whitening.apply <cgd_heads.retrieval.whitening.Whitening.apply>`) to the queries and the
   gallery;
2. DBA (:func:`~cgd_heads.retrieval.query_expansion.database_augmentation`: ``dba`` neighbours, the item itself
   included, weights ``max(s, 0) ** qe_alpha``) to the gallery;
3. alpha-QE (:func:`~cgd_heads.retrieval.query_expansion.query_expansion`: ``qe`` neighbours, exponent
   ``qe_alpha``) of the queries against the augmented gallery;
4. the search: exact inner product of the processed vectors (faiss ``IndexFlatIP``), or, with
   ``rerank = (k1, k2, lambda)``, k-reciprocal re-ranking of the processed queries against the processed gallery.

Two protocols, as in :func:`~cgd_heads.retrieval.metrics.evaluate_retrieval`:

* query-vs-gallery: the queries are not in the database, so DBA changes the gallery only.
* query-vs-rest (no gallery): the embeddings are the database and every item also queries it. DBA augments every
  item (the queries are database items), QE expands each item against the others (itself excluded by index), and
  query i never ranks item i (excluded by index, never by position: an exact duplicate still ranks).

Re-ranking is exact (:func:`~cgd_heads.retrieval.rerank.k_reciprocal_rerank_dense`) when it ranks among at most
:data:`DENSE_RERANK_MAX_ITEMS` items (G in query-vs-rest without QE, Q + G otherwise), and otherwise comes from a
faiss neighbour graph (:func:`~cgd_heads.retrieval.rerank.k_reciprocal_rerank_sparse`), which returns the same
top lists with the same distances up to exact ties. In query-vs-rest with QE, the expanded queries are no longer the
collection, so they are re-ranked as a query set of their own against the whole collection (Q + G = 2N items), and
each query's own item is then dropped from its list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..utils.checks import check_bool, check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import check_real, check_same_dim
from .clustering import normalized_mutual_info
from .metrics import (DEFAULT_CHUNK_SIZE, DEFAULT_KS, DEFAULT_MAX_R, check_inputs, ranking_metrics,
                      retrieval_protocol, search_metrics)
from .neighbours import flat_index, top_neighbours
from .query_expansion import database_augmentation, query_expansion
from .rerank import k_reciprocal_rerank_dense, k_reciprocal_rerank_sparse
from .whitening import Whitening

__all__ = ['PostProcess', 'evaluate_postprocessed', 'DENSE_RERANK_MAX_ITEMS']

#: Largest number of items re-ranked exactly over the full distance matrix: O(N^2) float64 memory and O(N^3) time
#: (about 100 MB and a few seconds at 1000 items, where the sparse version takes under a second). Larger sets use
#: the sparse version.
DENSE_RERANK_MAX_ITEMS = 1000


def _check_rerank(value: Any) -> Optional[Tuple[int, int, float]]:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) != 3:
        raise TypeError(f'rerank must be None or a (k1, k2, lambda) triple, got {value!r}')
    return (check_int(value[0], 'rerank k1'), check_int(value[1], 'rerank k2'),
            check_real(value[2], 'rerank lambda', 0.0, 1.0))


@dataclass(frozen=True)
class PostProcess:
    """Post-processing steps applied between the embeddings and the ranking: whitening, DBA, alpha-QE, then a
    plain search or k-reciprocal re-ranking (in that order; see the module docstring). The default does nothing.

    Attributes:
        whitening: A fitted :class:`~cgd_heads.retrieval.whitening.Whitening` applied to queries and gallery
            first, or None.
        qe: Neighbours of alpha-QE, an int >= 0 (0 = no query expansion).
        qe_alpha: Exponent of the QE and DBA weights, a real >= 0 (0 = plain averages; Radenovic et al. use 3).
        dba: Neighbours of DBA including the item itself, an int >= 0 (0 or 1 = no augmentation).
        rerank: ``(k1, k2, lambda)`` of k-reciprocal re-ranking (e.g. ``(20, 6, 0.3)``), or None for the plain
            inner-product ranking.
    """

    whitening: Optional[Whitening] = None
    qe: int = 0
    qe_alpha: float = 0.0
    dba: int = 0
    rerank: Optional[Tuple[int, int, float]] = None

    def __post_init__(self) -> None:
        if self.whitening is not None and not isinstance(self.whitening, Whitening):
            raise TypeError(f'whitening must be a Whitening or None, got {type(self.whitening).__name__}')
        object.__setattr__(self, 'qe', check_int(self.qe, 'qe', minimum=0))
        object.__setattr__(self, 'qe_alpha', check_real(self.qe_alpha, 'qe_alpha', 0.0))
        object.__setattr__(self, 'dba', check_int(self.dba, 'dba', minimum=0))
        object.__setattr__(self, 'rerank', _check_rerank(self.rerank))

    @property
    def is_identity(self) -> bool:
        """True when no step is on: the ranking is the plain inner-product search of the embeddings."""
        return self.whitening is None and self.qe == 0 and self.dba <= 1 and self.rerank is None

    def transform(self, queries: ArrayLike, gallery: Optional[ArrayLike] = None,
                  normalize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The processed vectors: whitening, then DBA of the gallery, then alpha-QE of the queries.

        Args:
            queries: ``(Q, D)`` L2-normalised query embeddings (the whole collection in query-vs-rest).
            gallery: ``(G, D)`` L2-normalised gallery embeddings, or None for query-vs-rest.
            normalize: L2-normalise the inputs instead of requiring unit norm.

        Returns:
            ``(queries', gallery')``: float32 arrays of unit rows (dimension ``whitening.dim`` with a whitening).
            In query-vs-rest ``gallery'`` is the processed collection and row i of ``queries'`` the expanded item i.

        Raises:
            TypeError: non-float inputs.
            ValueError: bad shapes, non-finite or non-unit rows, dims that disagree with each other or with the
                whitening.
        """
        q, g = _check_arrays(queries, gallery, normalize)
        return self._transform(q, g)

    def search(self, queries: ArrayLike, k: int = 10, gallery: Optional[ArrayLike] = None,
               normalize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """The top-``k`` gallery items per query after every step (see the module docstring).

        Args:
            queries: ``(Q, D)`` L2-normalised query embeddings (the whole collection in query-vs-rest).
            k: Results per query, a positive int; clipped to the items a query ranks (G, or N - 1 in query-vs-rest,
                where a query never ranks itself).
            gallery: ``(G, D)`` L2-normalised gallery embeddings, or None for query-vs-rest.
            normalize: L2-normalise the inputs instead of requiring unit norm.

        Returns:
            ``(scores, ids)``, both ``(Q, min(k, ranked))``, best first: int64 gallery ids (row ids of the
            collection in query-vs-rest) and scores where higher is better: the float32 inner product of the
            processed vectors, or with re-ranking minus the final k-reciprocal distance (float64).

        Raises:
            TypeError: as :meth:`transform`, or a non-int ``k``.
            ValueError: as :meth:`transform`; ``k < 1``; a query-vs-rest collection of one item.
        """
        q, g = _check_arrays(queries, gallery, normalize)
        k = check_int(k, 'k')
        available = len(q) - 1 if g is None else len(g)
        if available < 1:
            raise ValueError('query-vs-rest needs at least 2 embeddings: a query never ranks itself')
        processed_q, processed_g = self._transform(q, g)
        return self._rank(processed_q, processed_g, g is None, min(k, available))

    def _transform(self, q: np.ndarray, g: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`transform` on checked arrays (``g`` None: query-vs-rest, the queries are the gallery)."""
        rest = g is None
        if self.whitening is not None:
            q = self.whitening.apply(q)
            g = None if rest else self.whitening.apply(g)
        if rest:
            g = q
        if self.dba > 1:
            g = database_augmentation(g, self.dba, self.qe_alpha)
            if rest:
                q = g  # every item of the collection is a query too
        if self.qe > 0:
            q = query_expansion(q, g, self.qe, self.qe_alpha, query_vs_rest=rest)
        return q, g

    def _rank(self, q: np.ndarray, g: np.ndarray, rest: bool, top: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the ``top`` best gallery items per processed query (own item excluded if ``rest``)."""
        own = np.arange(len(q)) if rest else None
        if self.rerank is None:
            return top_neighbours(flat_index(g), q, top, own)
        k1, k2, lambda_value = self.rerank
        same = rest and (q is g or np.array_equal(q, g))  # query-vs-rest in the re-ranking's own sense
        if (len(g) if same else len(q) + len(g)) <= DENSE_RERANK_MAX_ITEMS:
            final = k_reciprocal_rerank_dense(q, g, k1, k2, lambda_value, query_vs_rest=same)
            if own is not None:
                final[own, own] = np.inf
            ids = np.argsort(final, axis=1, kind='stable')[:, :top]
            return -np.take_along_axis(final, ids, axis=1), ids
        extra = int(rest and not same)  # one more, to drop the query's own item
        ids, distances = k_reciprocal_rerank_sparse(q, g, k1, k2, lambda_value, top=top + extra,
                                                    query_vs_rest=same)
        if extra:
            keep = ids != own[:, None]
            keep[keep.all(axis=1), -1] = False  # own item not among them: drop the last instead
            ids, distances = ids[keep].reshape(len(q), top), distances[keep].reshape(len(q), top)
        return -distances, ids


def _check_arrays(queries: ArrayLike, gallery: Optional[ArrayLike],
                  normalize: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    q = to_embedding_array(queries, 'queries', normalize)
    if gallery is None:
        return q, None
    g = to_embedding_array(gallery, 'gallery', normalize)
    check_same_dim(q, g, 'queries', 'gallery')
    return q, g


def evaluate_postprocessed(
    embeddings: ArrayLike,
    labels: Any,
    postprocess: PostProcess,
    ks: Sequence[int] = DEFAULT_KS,
    gallery_embeddings: Optional[ArrayLike] = None,
    gallery_labels: Any = None,
    nmi: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_r: Optional[int] = DEFAULT_MAX_R,
    normalize: bool = False,
) -> Dict[str, float]:
    """:func:`~cgd_heads.retrieval.metrics.evaluate_retrieval` of the post-processed ranking.

    The embeddings go through ``postprocess`` (see the module docstring) and are then scored exactly as
    ``evaluate_retrieval`` scores raw ones: the same protocols, definitions, R and ``max_r`` cap, and the same
    result keys. Without re-ranking the processed vectors are searched exactly with faiss; with re-ranking each query
    gets a re-ranked list of ``max(max(ks), largest R')`` items (enough for MAP@R), read by the same metric code. An
    identity ``PostProcess()`` gives exactly ``evaluate_retrieval``'s result.

    Args:
        embeddings: ``(N, D)`` L2-normalised query embeddings (also the gallery when none is given).
        labels: ``N`` class labels (ints or strs).
        postprocess: The steps to apply.
        ks: Cut-offs K for Recall@K, as in ``evaluate_retrieval``.
        gallery_embeddings: Optional ``(N_gallery, D)`` gallery (query-vs-gallery); requires ``gallery_labels``.
        gallery_labels: ``N_gallery`` gallery labels, of the same kind as ``labels``.
        nmi: Also report ``'nmi'`` of the processed query embeddings (whitened, augmented, expanded; re-ranking
            changes no vector) and ``labels``.
        chunk_size: Most queries per faiss search call (no re-ranking); results do not depend on it.
        max_r: Cap on R for AP@R, as in ``evaluate_retrieval``.
        normalize: L2-normalise the embeddings instead of requiring unit norm.

    Returns:
        The dict of ``evaluate_retrieval``: ``recall@K``, ``precision@1``, ``map@r``, the counts, and ``nmi`` if
        asked.

    Raises:
        TypeError: as ``evaluate_retrieval``, or ``postprocess`` is not a :class:`PostProcess`.
        ValueError: as ``evaluate_retrieval``, or a whitening of another input dim.
    """
    if not isinstance(postprocess, PostProcess):
        raise TypeError(f'postprocess must be a PostProcess, got {type(postprocess).__name__}')
    nmi = check_bool(nmi, 'nmi')
    queries, query_labels, gallery, gallery_label_arr, ks, chunk_size, max_r = check_inputs(
        embeddings, labels, ks, gallery_embeddings, gallery_labels, chunk_size, max_r, normalize)
    rest = gallery_embeddings is None
    protocol = retrieval_protocol(query_labels, gallery_label_arr, ks, max_r, rest)
    q, g = postprocess._transform(queries, None if rest else gallery)
    if postprocess.rerank is None:
        results = search_metrics(q, g, protocol, chunk_size)
    else:
        _, ids = postprocess._rank(q, g, rest, protocol.list_length)
        results = ranking_metrics(ids, protocol)
    if nmi:
        results['nmi'] = normalized_mutual_info(q, query_labels)
    return results
