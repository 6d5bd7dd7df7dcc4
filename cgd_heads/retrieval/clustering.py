"""Clustering quality of embeddings: NMI between the class labels and a faiss k-means clustering.

For labels U and clusters V of N items, with n_uv the contingency table (items of class u in cluster v), n_u and
n_v its row and column sums,

    I(U; V) = sum_{u,v} (n_uv / N) log(N n_uv / (n_u n_v))          (terms with n_uv = 0 are 0)
    H(U)    = -sum_u (n_u / N) log(n_u / N),   H(V) likewise
    NMI     = I(U; V) / ((H(U) + H(V)) / 2)                        (arithmetic-mean normalisation)

which is scikit-learn's ``normalized_mutual_info_score`` with its default ``average_method='arithmetic'``,
including its conventions: 1 when both U and V have a single value (identical trivial partitions), 0 when either
has a single value and the other does not. The logarithm base cancels.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..utils.checks import check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import as_labels
from .faiss_import import faiss

__all__ = ['normalized_mutual_info', 'nmi_from_clusters', 'KMEANS_ITERATIONS']

#: Lloyd iterations of the k-means behind :func:`normalized_mutual_info`.
KMEANS_ITERATIONS = 20


def nmi_from_clusters(labels: Any, clusters: Any) -> float:
    """NMI of two partitions of the same N items, with arithmetic-mean normalisation (see the module docstring).

    Args:
        labels: ``N`` class labels (ints or strs; tensor, array or sequence).
        clusters: ``N`` cluster ids (ints or strs), e.g. k-means assignments.

    Returns:
        NMI in ``[0, 1]``.

    Raises:
        TypeError: float or non-sequence labels/clusters.
        ValueError: empty inputs, or lengths that differ.
    """
    try:
        n = len(labels)
    except TypeError:
        n = -1  # not a sequence: as_labels raises the TypeError that says what is accepted
    labels = as_labels(labels, n, 'labels')
    clusters = as_labels(clusters, len(labels), 'clusters')
    if len(labels) == 0:
        raise ValueError('labels and clusters must hold at least one item, got none')
    _, u = np.unique(labels, return_inverse=True)
    _, v = np.unique(clusters, return_inverse=True)
    u, v = u.reshape(-1), v.reshape(-1)
    table = np.zeros((u.max() + 1, v.max() + 1))
    np.add.at(table, (u, v), 1.0)
    if table.shape == (1, 1):
        return 1.0  # both partitions trivial and equal; H(U) + H(V) = 0
    total = float(len(u))
    p_uv = table / total
    p_u, p_v = p_uv.sum(axis=1), p_uv.sum(axis=0)
    nz = p_uv > 0
    mutual = float((p_uv[nz] * np.log(p_uv[nz] / np.outer(p_u, p_v)[nz])).sum())
    entropy_u, entropy_v = -float((p_u * np.log(p_u)).sum()), -float((p_v * np.log(p_v)).sum())
    if mutual <= 0.0:
        return 0.0  # also covers one trivial partition: I = 0 while H(U) + H(V) > 0
    return float(min(1.0, mutual / ((entropy_u + entropy_v) / 2)))


def normalized_mutual_info(embeddings: ArrayLike, labels: Any, num_clusters: Optional[int] = None,
                           seed: int = 0, normalize: bool = False) -> float:
    """NMI between the labels and a k-means clustering of the embeddings (faiss ``Kmeans``, L2, seeded).

    k-means runs ``KMEANS_ITERATIONS`` Lloyd iterations from faiss's seeded random initialisation, on all points
    (no subsampling); the NMI is :func:`nmi_from_clusters` of the labels and the assignments. Results are
    deterministic for a given seed, faiss version and thread count.

    Args:
        embeddings: ``(N, D)`` L2-normalised embeddings.
        labels: ``N`` class labels (ints or strs).
        num_clusters: k, an int in ``[1, N]``; None = the number of distinct labels.
        seed: Seed of the k-means initialisation, an int >= 0.
        normalize: L2-normalise the embeddings instead of requiring unit norm.

    Returns:
        NMI in ``[0, 1]``.

    Raises:
        TypeError: non-float embeddings, float labels, a non-int ``num_clusters`` or ``seed``.
        ValueError: bad shapes, non-finite or non-unit rows, a label count other than N, ``num_clusters``
            outside ``[1, N]``, a negative ``seed``.
    """
    x = to_embedding_array(embeddings, 'embeddings', normalize)
    labels = as_labels(labels, len(x), 'labels')
    seed = check_int(seed, 'seed', minimum=0)
    k = check_int(num_clusters, 'num_clusters', allow_none=True)
    k = len(np.unique(labels)) if k is None else k
    if k > len(x):
        raise ValueError(f'num_clusters must be at most the number of embeddings ({len(x)}), got {k}')
    if k == 1:
        return nmi_from_clusters(labels, np.zeros(len(x), np.int64))
    # min_points_per_centroid=1 silences faiss's "please provide at least 39 * k points" warning on small sets;
    # max_points_per_centroid=N keeps it from subsampling large ones
    kmeans = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=len(x))
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return nmi_from_clusters(labels, assignment[:, 0])
