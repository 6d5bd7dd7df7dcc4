"""Retrieval post-processing (whitening, alpha-QE / DBA, k-reciprocal re-ranking, NMI) against references written
from the formulas with plain numpy loops, sets and full matrices, never by calling the code under test."""
import itertools
import json

import numpy as np
import pytest
import scipy.linalg
import torch

import cgd_heads
from cgd_heads.retrieval import (Whitening, database_augmentation, evaluate_retrieval, k_reciprocal_rerank_dense,
                                 k_reciprocal_rerank_sparse, nmi_from_clusters, normalized_mutual_info,
                                 query_expansion)
from cgd_heads.retrieval.whitening import METADATA_FILE, WEIGHTS_FILE


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(num_classes: int, per_class: int, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """Unit vectors around one random centre per class, labels 0 .. C-1 in blocks."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.normal(size=(num_classes, dim))
    return unit(centres[labels] + noise * rng.normal(size=(len(labels), dim))), labels


def align_signs(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """``reference`` with each column's sign flipped to match ``actual`` (eigenvectors are defined up to sign)."""
    return reference * np.sign((reference * actual).sum(axis=0))


# ----------------------------------------------------------------------------------------------------- whitening

@pytest.mark.parametrize('whiten, shrinkage, dim', [(True, 1.0, 12), (True, 0.5, 5), (True, 0.0, 8), (False, 1.0, 3)])
def test_pca_whitening_matches_the_svd_of_the_centred_data(whiten, shrinkage, dim):
    x, _ = clustered(4, 20, dim=12)
    w = Whitening.fit_pca(x, dim=dim, whiten=whiten, shrinkage=shrinkage)
    x64 = x.astype(np.float64)
    mean = x64.sum(axis=0) / len(x64)
    _, s, vt = np.linalg.svd(x64 - mean, full_matrices=False)  # eigenvalues of C = s^2 / N, eigenvectors vt rows
    power = shrinkage if whiten else 0.0
    reference = vt[:dim].T * (s[:dim] ** 2 / len(x64)) ** (-power / 2)
    reference = align_signs(reference, w.projection)
    np.testing.assert_allclose(w.mean, mean, atol=1e-6)
    np.testing.assert_allclose(w.projection, reference, rtol=1e-4, atol=1e-5)
    y = (x64 - mean) @ reference
    np.testing.assert_allclose(w.apply(x), y / np.linalg.norm(y, axis=1, keepdims=True), atol=1e-5)
    assert (w.kind, w.dim, w.input_dim, w.shrinkage) == ('pca', dim, 12, power)
    if whiten and shrinkage == 1.0:  # full whitening: the fitted data has identity covariance before normalising
        np.testing.assert_allclose(y.T @ y / len(y), np.eye(dim), atol=1e-6)


def pair_covariances_by_loops(x: np.ndarray, labels: np.ndarray):
    """C_S, C_D as mean outer products of x_i - x_j over every pair i < j, matching / non-matching."""
    dim = x.shape[1]
    match, non_match, num_match, num_non_match = np.zeros((dim, dim)), np.zeros((dim, dim)), 0, 0
    for i, j in itertools.combinations(range(len(x)), 2):
        diff = (x[i] - x[j])[:, None]
        if labels[i] == labels[j]:
            match += diff @ diff.T
            num_match += 1
        else:
            non_match += diff @ diff.T
            num_non_match += 1
    return match / num_match, non_match / num_non_match


@pytest.mark.parametrize('shrinkage', [1.0, 0.5, 0.0])
def test_learned_whitening_matches_the_pairwise_definition(shrinkage):
    # 6 classes in 5 dims: distinct eigenvalues (7.3, 3.9, 2.8, 1.7, 1.1), so the eigenvectors are defined up to
    # sign (with fewer classes than dims the trailing eigenvalues are equal and any rotation of them is valid)
    x, labels = clustered(6, 8, dim=5, noise=0.6, seed=0)
    x64 = x.astype(np.float64)
    c_s, c_d = pair_covariances_by_loops(x64, labels)
    whiten = scipy.linalg.fractional_matrix_power(c_s, -shrinkage / 2).real
    mu, vectors = np.linalg.eigh(whiten @ c_d @ whiten)
    order = np.argsort(-mu)
    kwargs = {} if shrinkage == 1.0 else {'shrinkage': shrinkage}  # 1 is the default
    w = Whitening.fit_learned(torch.from_numpy(x), torch.from_numpy(labels), dim=4, **kwargs)
    reference = align_signs(whiten @ vectors[:, order[:4]], w.projection)
    np.testing.assert_allclose(w.projection, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w.mean, x64.mean(axis=0), atol=1e-6)
    # what the construction guarantees: non-matching differences decorrelated and sorted, and with full whitening
    # (s = 1) the matching differences white
    p = w.projection.astype(np.float64)
    np.testing.assert_allclose(p.T @ c_d @ p, np.diag(mu[order[:4]]), atol=1e-4)
    if shrinkage == 1.0:
        np.testing.assert_allclose(p.T @ c_s @ p, np.eye(4), atol=1e-4)
    assert (w.kind, w.shrinkage) == ('learned', shrinkage)


def test_learned_whitening_improves_recall_at_1_on_unseen_classes():
    # classes differ in every dim, but a shared nuisance (strong noise in 6 of 24 dims) hides them; the whitening
    # is learned on 12 classes and evaluated on 12 others, as in metric learning
    rng = np.random.default_rng(3)
    dim, per_class = 24, 12
    labels = np.repeat(np.arange(24), per_class)
    centres = rng.normal(size=(24, dim))
    noise_scale = np.where(np.arange(dim) < 6, 6.0, 0.5)
    x = unit(centres[labels] + rng.normal(size=(len(labels), dim)) * noise_scale)
    train, test = labels < 12, labels >= 12
    raw = evaluate_retrieval(x[test], labels[test], ks=(1,))['recall@1']
    w = Whitening.fit_learned(x[train], labels[train], dim=18)
    whitened = evaluate_retrieval(w.apply(x[test]), labels[test], ks=(1,))['recall@1']
    pca = Whitening.fit_pca(x[train], dim=18)
    pca_whitened = evaluate_retrieval(pca.apply(x[test]), labels[test], ks=(1,))['recall@1']
    assert whitened > raw + 0.15, (raw, whitened)
    assert whitened >= pca_whitened, (pca_whitened, whitened)


def test_whitening_save_load_round_trip_and_fingerprint_refusal(tmp_path):
    x, labels = clustered(3, 8, dim=8)
    w = Whitening.fit_learned(x, labels, dim=5)
    (tmp_path / 'model.safetensors').write_text('other file')
    w.save(tmp_path, fingerprint='model-abc')
    assert (tmp_path / 'model.safetensors').read_text() == 'other file'  # the folder is not replaced
    info = json.loads((tmp_path / METADATA_FILE).read_text())
    assert {k: info[k] for k in ('kind', 'dim', 'input_dim', 'shrinkage', 'fingerprint')} == \
        {'kind': 'learned', 'dim': 5, 'input_dim': 8, 'shrinkage': 1.0, 'fingerprint': 'model-abc'}
    loaded = Whitening.load(tmp_path, expected_fingerprint='model-abc')
    np.testing.assert_array_equal(loaded.mean, w.mean)
    np.testing.assert_array_equal(loaded.projection, w.projection)
    assert (loaded.kind, loaded.fingerprint) == ('learned', 'model-abc')
    np.testing.assert_array_equal(loaded.apply(x), w.apply(x))
    assert Whitening.load(tmp_path).fingerprint == 'model-abc'
    with pytest.raises(ValueError, match="'model-abc'.*'model-xyz'"):
        Whitening.load(tmp_path, expected_fingerprint='model-xyz')
    w.save(tmp_path / 'no_fp')
    with pytest.raises(ValueError, match="None.*'model-abc'"):
        Whitening.load(tmp_path / 'no_fp', expected_fingerprint='model-abc')
    (tmp_path / WEIGHTS_FILE).write_bytes((tmp_path / WEIGHTS_FILE).read_bytes()[:-4] + b'\0\0\0\0')
    with pytest.raises(ValueError, match='SHA-256'):
        Whitening.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Whitening.load(tmp_path / 'missing')
    with pytest.raises(TypeError, match='fingerprint'):
        w.save(tmp_path, fingerprint=123)


def test_whitening_degenerate_inputs_stay_finite():
    x, labels = clustered(2, 3, dim=16)  # N = 6 < D = 16: rank-deficient covariances, floored eigenvalues
    x = np.vstack([x, x[:2]])  # and exact duplicates
    labels = np.concatenate([labels, labels[:2]])
    for w in (Whitening.fit_pca(x), Whitening.fit_learned(x, labels, dim=4)):
        assert np.isfinite(w.projection).all()
        np.testing.assert_allclose(np.linalg.norm(w.apply(x), axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match='all vectors equal'):
        Whitening.fit_pca(np.repeat(x[:1], 4, axis=0))


@pytest.mark.parametrize('kwargs, error, match', [
    ({'dim': 17}, ValueError, 'dim must be at most the embedding dim 16'),
    ({'dim': 0}, ValueError, 'dim must be a positive int'),
    ({'dim': 2.0}, TypeError, 'dim must be a positive int'),
    ({'shrinkage': 1.5}, ValueError, r'shrinkage must be a real number in \[0.0, 1.0\]'),
    ({'shrinkage': -0.1}, ValueError, 'shrinkage'),
    ({'shrinkage': 'half'}, TypeError, 'shrinkage'),
    ({'whiten': 1}, TypeError, 'whiten must be a bool'),
])
def test_fit_pca_rejects_bad_arguments(kwargs, error, match):
    x, _ = clustered(2, 5)
    with pytest.raises(error, match=match):
        Whitening.fit_pca(x, **kwargs)


def test_whitening_rejects_bad_data():
    x, labels = clustered(3, 4)
    with pytest.raises(ValueError, match='at least 2 vectors'):
        Whitening.fit_pca(x[:1])
    bad = x.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match='row 2 contains NaN'):
        Whitening.fit_pca(bad)
    with pytest.raises(ValueError, match='2-D'):
        Whitening.fit_pca(x[0])
    with pytest.raises(ValueError, match='L2-normalised'):
        Whitening.fit_pca(x * 3)
    assert Whitening.fit_pca(x * 3, normalize=True).dim == 16
    with pytest.raises(ValueError, match='every label is unique'):
        Whitening.fit_learned(x, np.arange(len(x)))
    with pytest.raises(ValueError, match='at least 2 classes'):
        Whitening.fit_learned(x, np.zeros(len(x), np.int64))
    with pytest.raises(ValueError, match='one entry per embedding'):
        Whitening.fit_learned(x, labels[:-1])
    with pytest.raises(TypeError, match='ints or strs'):
        Whitening.fit_learned(x, labels.astype(float))
    with pytest.raises(ValueError, match='shrinkage'):
        Whitening.fit_learned(x, labels, shrinkage=1.5)
    with pytest.raises(TypeError, match='shrinkage'):
        Whitening.fit_learned(x, labels, shrinkage='half')
    with pytest.raises(ValueError, match='16 columns'):
        Whitening.fit_pca(x).apply(unit(np.ones((2, 8))))


# ---------------------------------------------------------------------------------------- query expansion and DBA

def expansion_by_loops(queries, gallery, n, alpha, exclude_self=False, self_first=False):
    """Per query: rank the gallery by <q, g> (stable, own index excluded or forced first), weight, sum, normalise."""
    out = []
    for i, q in enumerate(queries.astype(np.float64)):
        g = gallery.astype(np.float64)
        sims = g @ q
        order = [j for j in np.argsort(-sims, kind='stable') if not (exclude_self or self_first) or j != i]
        if self_first:
            order = [i] + order
        total = np.zeros_like(q) if self_first else q.copy()
        for j in order[:n]:
            weight = 1.0 if alpha == 0 or (self_first and j == i) else max(sims[j], 0.0) ** alpha
            total += weight * g[j]
        out.append(total / np.linalg.norm(total))
    return np.array(out)


@pytest.mark.parametrize('n, alpha', [(1, 0.0), (3, 0.0), (4, 3.0), (10, 1.5)])
def test_query_expansion_matches_the_loop(n, alpha):
    x, _ = clustered(4, 10, seed=2)
    queries, gallery = x[:8], x[8:]
    np.testing.assert_allclose(query_expansion(queries, gallery, n, alpha),
                               expansion_by_loops(queries, gallery, n, alpha), atol=1e-5)


def test_query_expansion_query_vs_rest_never_uses_the_query_itself():
    x, _ = clustered(3, 6, seed=4)
    x[5] = x[4]  # an exact duplicate: a neighbour of item 4 at similarity 1, but not item 4 itself
    got = query_expansion(x, x, 2, alpha=3.0, query_vs_rest=True)
    np.testing.assert_allclose(got, expansion_by_loops(x, x, 2, 3.0, exclude_self=True), atol=1e-5)
    others = [j for j in np.argsort(-(x @ x[4]), kind='stable') if j != 4][:2]
    assert 5 in others  # so the duplicate did take part in item 4's expansion
    with pytest.raises(ValueError, match='query_vs_rest=True needs the gallery to be the queries'):
        query_expansion(x[:4], x, 2, query_vs_rest=True)
    with pytest.raises(TypeError, match='query_vs_rest must be a bool'):
        query_expansion(x, x, 2, query_vs_rest='yes')


def test_query_expansion_clamps_n_to_the_gallery():
    x, _ = clustered(2, 5, seed=5)
    queries, gallery = x[:3], x[3:]
    everything = query_expansion(queries, gallery, len(gallery))
    np.testing.assert_array_equal(query_expansion(queries, gallery, 1000), everything)
    np.testing.assert_allclose(everything, unit(queries + gallery.sum(axis=0)), atol=1e-6)
    np.testing.assert_array_equal(query_expansion(x, x, 1000, query_vs_rest=True),
                                  query_expansion(x, x, len(x) - 1, query_vs_rest=True))
    np.testing.assert_allclose(query_expansion(queries, gallery, 0), queries, atol=1e-7)
    single = x[:1]
    np.testing.assert_allclose(query_expansion(single, single, 5, query_vs_rest=True), single)  # nothing else


def test_query_expansion_with_cancelling_neighbours_keeps_the_query():
    q = np.array([[1.0, 0.0]], np.float32)
    np.testing.assert_array_equal(query_expansion(q, -q, 1, alpha=0.0), q)  # average QE: q + (-q) = 0


@pytest.mark.parametrize('n, alpha', [(1, 0.0), (2, 0.0), (4, 3.0), (100, 0.0)])
def test_database_augmentation_matches_the_loop(n, alpha):
    x, _ = clustered(3, 7, seed=6)
    x[3] = x[2]  # duplicates still count as other items
    got = database_augmentation(x, n, alpha)
    np.testing.assert_allclose(got, expansion_by_loops(x, x, n, alpha, self_first=True), atol=1e-5)
    np.testing.assert_array_equal(got, query_expansion(x, x, n - 1, alpha, query_vs_rest=True))
    if n == 1:
        np.testing.assert_allclose(got, x, atol=1e-7)


@pytest.mark.parametrize('call, error, match', [
    (lambda x: query_expansion(x, x, -1), ValueError, 'n must be an int >= 0'),
    (lambda x: query_expansion(x, x, 2.5), TypeError, 'n must be an int >= 0'),
    (lambda x: query_expansion(x, x, 2, alpha=-1.0), ValueError, 'alpha must be a real number >= 0'),
    (lambda x: query_expansion(x, x, 2, alpha=float('nan')), ValueError, 'alpha'),
    (lambda x: query_expansion(x, unit(x[:, :8]), 2), ValueError, 'gallery must have the same dim as queries'),
    (lambda x: database_augmentation(x, 0), ValueError, 'n must be a positive int'),
    (lambda x: database_augmentation(x * 2, 2), ValueError, 'L2-normalised'),
])
def test_expansion_rejects_bad_arguments(call, error, match):
    x, _ = clustered(2, 4)
    with pytest.raises(error, match=match):
        call(x)


# ------------------------------------------------------------------------------------ k-reciprocal re-ranking

def rerank_by_sets(queries, gallery, k1, k2, lam, query_vs_rest=False):
    """The paper's equations with Python sets and loops over an explicit (N, N) distance matrix."""
    items = (gallery if query_vs_rest else np.vstack([queries, gallery])).astype(np.float64)
    n = len(items)
    dist = np.array([[np.sum((items[i] - items[j]) ** 2) for j in range(n)] for i in range(n)])
    for i in range(n):
        if dist[i].max() > 0:
            dist[i] = dist[i] / dist[i].max()
    order = [sorted(range(n), key=lambda j, i=i: (j != i, dist[i, j], j)) for i in range(n)]

    def reciprocal(p, k):
        return {g for g in order[p][:k + 1] if p in order[g][:k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, int(np.around(k1 / 2)))
            if 3 * len(rc & r) > 2 * len(rc):
                expanded |= rc
        total = sum(np.exp(-dist[p, g]) for g in expanded)
        for g in expanded:
            v[p, g] = np.exp(-dist[p, g]) / total
    if k2 > 1:
        v = np.array([np.mean([v[j] for j in order[p][:k2]], axis=0) for p in range(n)])
    offset = 0 if query_vs_rest else len(queries)
    final = np.zeros((len(queries), len(gallery)))
    for a in range(len(queries)):
        for b in range(len(gallery)):
            pair = v[[a, offset + b]]
            jaccard = 1 - pair.min(axis=0).sum() / pair.max(axis=0).sum()
            final[a, b] = (1 - lam) * jaccard + lam * dist[a, offset + b]
        if query_vs_rest:
            final[a, a] = np.inf
    return final


@pytest.mark.parametrize('k1, k2, lam', [(6, 3, 0.3), (5, 1, 0.0), (4, 6, 1.0), (50, 60, 0.3), (1, 2, 0.5)])
def test_dense_rerank_matches_the_equations(k1, k2, lam):
    x, _ = clustered(4, 8, seed=7)
    queries, gallery = x[:7], x[7:]
    np.testing.assert_allclose(k_reciprocal_rerank_dense(queries, gallery, k1, k2, lam),
                               rerank_by_sets(queries, gallery, k1, k2, lam), atol=1e-5)


def test_dense_rerank_query_vs_rest_with_duplicates_matches_the_equations():
    x, _ = clustered(3, 8, seed=8)
    x[1] = x[0]
    got = k_reciprocal_rerank_dense(x, x, 5, 3, 0.3, query_vs_rest=True)
    np.testing.assert_allclose(got, rerank_by_sets(x, x, 5, 3, 0.3, query_vs_rest=True), atol=1e-5)
    assert np.isinf(np.diag(got)).all() and np.isfinite(got[~np.eye(len(x), dtype=bool)]).all()


def test_dense_rerank_with_lambda_1_is_the_normalised_original_distance():
    x, _ = clustered(3, 6, seed=9)
    got = k_reciprocal_rerank_dense(x[:5], x[5:], 4, 2, 1.0)
    d = ((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(axis=2)
    np.testing.assert_allclose(got, (d / d.max(axis=1, keepdims=True))[:5, 5:], atol=1e-5)


def test_rerank_of_identical_vectors_stays_finite():
    x = unit(np.ones((6, 4)))
    dense = k_reciprocal_rerank_dense(x[:2], x[2:], 3, 2, 0.3)
    ids, dist = k_reciprocal_rerank_sparse(x[:2], x[2:], 3, 2, 0.3, top=4)
    assert np.isfinite(dense).all() and np.isfinite(dist).all()
    np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, axis=1), atol=1e-6)


@pytest.mark.parametrize('query_vs_rest', [False, True])
def test_sparse_rerank_with_everything_retrieved_equals_dense(query_vs_rest):
    x, _ = clustered(6, 10, seed=10)
    queries, gallery = (x, x) if query_vs_rest else (x[:15], x[15:])
    n_items = len(gallery) if query_vs_rest else len(x)
    available = len(gallery) - int(query_vs_rest)
    dense = k_reciprocal_rerank_dense(queries, gallery, 8, 3, 0.3, query_vs_rest=query_vs_rest)
    ids, dist = k_reciprocal_rerank_sparse(queries, gallery, 8, 3, 0.3, num_neighbors=n_items, top=available,
                                           query_vs_rest=query_vs_rest)
    np.testing.assert_array_equal(ids, np.argsort(dense, axis=1, kind='stable')[:, :available])
    np.testing.assert_allclose(dist, np.sort(dense, axis=1)[:, :available], atol=1e-9)
    if query_vs_rest:
        assert not (ids == np.arange(len(x))[:, None]).any()


def test_sparse_rerank_with_a_small_graph_agrees_with_dense_on_the_top_10():
    x, _ = clustered(12, 25, dim=16, noise=1.0, seed=11)  # 300 items: 60 queries, 240 gallery
    queries, gallery = x[:60], x[60:]
    dense = k_reciprocal_rerank_dense(queries, gallery, 20, 6, 0.3)
    ids, dist = k_reciprocal_rerank_sparse(queries, gallery, 20, 6, 0.3, num_neighbors=21, top=10)
    reference = np.argsort(dense, axis=1, kind='stable')[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, reference)])
    same_position = (ids == reference).mean()
    assert overlap >= 0.95 and same_position >= 0.9, (overlap, same_position)  # measured: 1.0 and 1.0
    # every returned distance is the dense one: nothing is approximated, only the candidate set is restricted
    np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, axis=1), atol=1e-9)
    assert (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize('lam', [0.0, 0.1])
def test_sparse_rerank_returns_the_dense_top_list_up_to_ties_at_the_bound(lam):
    # small k-reciprocal sets and a long list, so most gallery items are not candidates (d_J = 1); the T >= top
    # nearest are candidates with final <= bound = (1 - lambda) + lambda d'_T, non-candidates have final >= bound,
    # so the list can differ from the dense one only by items tied exactly at the bound: with lambda = 0 every
    # non-candidate has final = 1 exactly, and the dense ranking orders those by id
    x, _ = clustered(10, 12, dim=16, noise=1.5, seed=18)
    queries, gallery = x[:20], x[20:]
    dense = k_reciprocal_rerank_dense(queries, gallery, 3, 1, lam)
    ids, dist = k_reciprocal_rerank_sparse(queries, gallery, 3, 1, lam, top=30)
    reference = np.argsort(dense, axis=1, kind='stable')[:, :30]
    np.testing.assert_allclose(dist, np.sort(dense, axis=1)[:, :30], atol=1e-9)
    np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, axis=1), atol=1e-9)
    below_one = dense[np.arange(20)[:, None], reference] < 1 - 1e-9
    np.testing.assert_array_equal(ids[below_one], reference[below_one])
    if lam > 0:
        np.testing.assert_array_equal(ids, reference)
    else:
        assert 0 < below_one.mean() < 0.5 and (ids != reference).any()  # the tie case does occur here


def test_sparse_rerank_query_vs_rest_with_duplicates_never_returns_the_query():
    x, _ = clustered(4, 6, seed=12)
    x[1] = x[0]
    x[2] = x[0]
    ids, dist = k_reciprocal_rerank_sparse(x, x, 4, 2, 0.3, top=5, query_vs_rest=True)
    assert ids.shape == (len(x), 5) and not (ids == np.arange(len(x))[:, None]).any()
    assert {1, 2} <= set(ids[0])  # the duplicates are ranked, only the query itself is excluded
    # with K = N no tie straddles the K-th place (with K = 5, item 3's 5th neighbour is one of the three tied
    # duplicates, which faiss may pick differently from the dense ranking's lowest id: a documented departure)
    ids, dist = k_reciprocal_rerank_sparse(x, x, 4, 2, 0.3, num_neighbors=len(x), top=5, query_vs_rest=True)
    dense = k_reciprocal_rerank_dense(x, x, 4, 2, 0.3, query_vs_rest=True)
    np.testing.assert_allclose(dist, np.take_along_axis(dense, ids, axis=1), atol=1e-9)
    np.testing.assert_allclose(dist, np.sort(dense, axis=1)[:, :5], atol=1e-9)


def test_sparse_rerank_clamps_k_to_the_items_and_defaults_top():
    x, _ = clustered(2, 4, seed=13)
    ids, dist = k_reciprocal_rerank_sparse(x[:2], x[2:], k1=20, k2=6)  # k1 + 1 > N = 8: everything
    assert ids.shape == (2, 6)
    np.testing.assert_allclose(dist, np.sort(k_reciprocal_rerank_dense(x[:2], x[2:], 20, 6), axis=1), atol=1e-9)


@pytest.mark.parametrize('kwargs, error, match', [
    ({'k1': 0}, ValueError, 'k1 must be a positive int'),
    ({'k2': 1.0}, TypeError, 'k2 must be a positive int'),
    ({'lambda_value': 1.5}, ValueError, r'lambda_value must be a real number in \[0.0, 1.0\]'),
    ({'num_neighbors': 3}, ValueError, r'num_neighbors must be >= max\(k1 \+ 1, k2\) = 5'),
    ({'top': 9}, ValueError, 'top must be at most the 8 gallery items'),
    ({'top': 0}, ValueError, 'top must be a positive int'),
    ({'query_vs_rest': True}, ValueError, 'query_vs_rest=True needs the gallery to be the queries'),
])
def test_sparse_rerank_rejects_bad_arguments(kwargs, error, match):
    x, _ = clustered(2, 5, seed=14)
    args = {'k1': 4, 'k2': 2, 'lambda_value': 0.3, **kwargs}
    with pytest.raises(error, match=match):
        k_reciprocal_rerank_sparse(x[:2], x[2:], **args)


def test_rerank_rejects_a_gallery_without_other_items():
    x, _ = clustered(1, 1)
    with pytest.raises(ValueError, match='at least one item a query can rank'):
        k_reciprocal_rerank_sparse(x, x, 2, 1, 0.3, query_vs_rest=True)
    with pytest.raises(ValueError, match='gallery must have the same dim'):
        k_reciprocal_rerank_dense(x, unit(x[:, :4]), 2, 1, 0.3)


# ------------------------------------------------------------------------------------------------------------ NMI

def nmi_by_entropies(labels, clusters):
    """I(U;V) / ((H(U) + H(V)) / 2) from explicit counts."""
    n = len(labels)
    classes, groups = sorted(set(labels)), sorted(set(clusters))
    if len(classes) == len(groups) == 1:
        return 1.0
    p_u = {u: sum(1 for a in labels if a == u) / n for u in classes}
    p_v = {v: sum(1 for b in clusters if b == v) / n for v in groups}
    mutual = 0.0
    for u in classes:
        for v in groups:
            p_uv = sum(1 for a, b in zip(labels, clusters) if a == u and b == v) / n
            if p_uv > 0:
                mutual += p_uv * np.log(p_uv / (p_u[u] * p_v[v]))
    h_u = -sum(p * np.log(p) for p in p_u.values())
    h_v = -sum(p * np.log(p) for p in p_v.values())
    return 0.0 if mutual <= 1e-15 else mutual / ((h_u + h_v) / 2)


CLUSTERINGS = [
    ([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2]),  # the same partition, relabelled: 1
    ([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]),  # independent: 0
    ([0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 2, 2, 0, 2]),
    (['a', 'a', 'b', 'b', 'c'], [5, 5, 5, 7, 7]),
    ([3, 3, 3], [0, 0, 0]),  # one class, one cluster: 1 by convention
    ([3, 3, 3], [0, 1, 2]),  # one class, three clusters: 0
]


@pytest.mark.parametrize('labels, clusters', CLUSTERINGS)
def test_nmi_from_clusters_matches_the_entropy_formula_and_sklearn(labels, clusters):
    got = nmi_from_clusters(labels, clusters)
    assert got == pytest.approx(nmi_by_entropies(labels, clusters), abs=1e-12)
    metrics = pytest.importorskip('sklearn.metrics')
    assert got == pytest.approx(metrics.normalized_mutual_info_score(labels, clusters), abs=1e-12)


def test_nmi_from_clusters_on_random_assignments_matches_sklearn():
    rng = np.random.default_rng(15)
    labels, clusters = rng.integers(0, 7, 300), rng.integers(0, 5, 300)
    got = nmi_from_clusters(torch.from_numpy(labels), clusters)
    assert got == pytest.approx(nmi_by_entropies(labels.tolist(), clusters.tolist()), abs=1e-12)
    metrics = pytest.importorskip('sklearn.metrics')
    assert got == pytest.approx(metrics.normalized_mutual_info_score(labels, clusters), abs=1e-12)


def test_normalized_mutual_info_of_k_means():
    x, labels = clustered(5, 20, noise=0.05, seed=16)  # tight clusters: k-means recovers them
    assert normalized_mutual_info(x, labels) == pytest.approx(1.0, abs=1e-9)
    noisy, noisy_labels = clustered(5, 20, noise=3.0, seed=16)
    first = normalized_mutual_info(noisy, noisy_labels, seed=1)
    assert first == normalized_mutual_info(noisy, noisy_labels, seed=1) and 0 <= first < 0.9
    assert normalized_mutual_info(x, labels, num_clusters=1) == 0.0
    assert normalized_mutual_info(x[:20], labels[:20]) == 1.0  # one class and k = 1
    with pytest.raises(ValueError, match='num_clusters must be at most the number of embeddings'):
        normalized_mutual_info(x[:4], [0, 1, 2, 3], num_clusters=5)
    with pytest.raises(ValueError, match='one entry per embedding'):
        normalized_mutual_info(x, labels[:-1])
    with pytest.raises(ValueError, match='clusters must have one entry per embedding'):
        nmi_from_clusters([0, 1], [0])


def test_evaluate_retrieval_reports_nmi_only_when_asked():
    x, labels = clustered(4, 10, seed=17)
    plain = evaluate_retrieval(x, labels)
    with_nmi = evaluate_retrieval(x, labels, nmi=True)
    assert 'nmi' not in plain
    assert with_nmi.pop('nmi') == normalized_mutual_info(x, labels)
    assert with_nmi == plain


def test_public_names_are_exported_lazily():
    for name in ('Whitening', 'query_expansion', 'database_augmentation', 'k_reciprocal_rerank_dense',
                 'k_reciprocal_rerank_sparse', 'normalized_mutual_info', 'nmi_from_clusters'):
        assert getattr(cgd_heads, name) is getattr(cgd_heads.retrieval, name)
