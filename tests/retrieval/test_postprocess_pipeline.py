"""The post-processing pipeline (whitening -> DBA -> alpha-QE -> search or k-reciprocal re-ranking) and its
evaluation: an identity pipeline is evaluate_retrieval exactly, and every other result equals metrics computed here
with numpy loops from the composed steps' full score or distance matrix."""
import json

import numpy as np
import pytest

import cgd_heads.retrieval.postprocess as postprocess_module
from cgd_heads.retrieval import (PostProcess, RetrievalIndex, ShardedIndex, Whitening, database_augmentation,
                                 evaluate_postprocessed, evaluate_retrieval, k_reciprocal_rerank_dense,
                                 model_fingerprint, normalized_mutual_info, query_expansion)


def unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def clustered(num_classes: int, per_class, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """Unit vectors around one random centre per class; ``per_class`` an int or one size per class."""
    rng = np.random.default_rng(seed)
    sizes = [per_class] * num_classes if isinstance(per_class, int) else list(per_class)
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.normal(size=(num_classes, dim))
    return unit(centres[labels] + noise * rng.normal(size=(len(labels), dim))), labels


def reference_metrics(distance: np.ndarray, query_labels, gallery_labels, ks, exclude_self: bool) -> dict:
    """Recall@K, precision@1 and MAP@R from a full (Q, G) distance matrix (smaller = better, ties by lower id),
    one query at a time over its whole ranking: rel(i), R and AP@R written out from their definitions."""
    recalls, top1, aps = {k: [] for k in ks}, [], []
    for i in range(len(distance)):
        order = [int(j) for j in np.argsort(distance[i], kind='stable') if not (exclude_self and j == i)]
        rel = [gallery_labels[j] == query_labels[i] for j in order]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            recalls[k].append(any(rel[:k]))
        top1.append(rel[0])
        hits, total = 0, 0.0
        for rank in range(r):
            if rel[rank]:
                hits += 1
                total += hits / (rank + 1)
        aps.append(total / r)
    out = {f'recall@{k}': float(np.mean(recalls[k])) for k in ks}
    out.update({'precision@1': float(np.mean(top1)), 'map@r': float(np.mean(aps)), 'num_queries': len(aps)})
    return out


def assert_metrics_equal(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-12), key


def composed(x, whitening, dba, qe, alpha, gallery=None):
    """The embedding steps by hand, from the library's individual functions: (queries', gallery')."""
    q = x if whitening is None else whitening.apply(x)
    g = q if gallery is None else (gallery if whitening is None else whitening.apply(gallery))
    if dba > 1:
        g = database_augmentation(g, dba, alpha)
        q = g if gallery is None else q
    if qe > 0:
        q = query_expansion(q, g, qe, alpha, query_vs_rest=gallery is None)
    return q, g


# ------------------------------------------------------------------------------------------- identity pipeline

@pytest.mark.parametrize('gallery', [False, True])
def test_identity_pipeline_equals_evaluate_retrieval_exactly(gallery):
    x, labels = clustered(6, 7, seed=1)
    kwargs = {}
    if gallery:
        g, gl = clustered(6, 9, seed=2)
        kwargs = dict(gallery_embeddings=g, gallery_labels=gl)
    for extra in ({}, {'max_r': 3}, {'ks': (1, 3, 5)}):
        expected = evaluate_retrieval(x, labels, nmi=True, **kwargs, **extra)
        assert evaluate_postprocessed(x, labels, PostProcess(), nmi=True, **kwargs, **extra) == expected
    assert PostProcess().is_identity and PostProcess(dba=1).is_identity and not PostProcess(qe=1).is_identity


# --------------------------------------------------------------------------------- steps without re-ranking

def test_whitening_dba_and_qe_metrics_match_the_composed_inner_products():
    x, labels = clustered(8, 8, seed=3)
    whitening = Whitening.fit_pca(clustered(8, 10, seed=4)[0], dim=10)
    pp = PostProcess(whitening, qe=2, qe_alpha=3.0, dba=3)
    q, g = composed(x, whitening, 3, 2, 3.0)
    distance = -(q.astype(np.float64) @ g.astype(np.float64).T)
    expected = reference_metrics(distance, labels, labels, (1, 2, 4), exclude_self=True)
    result = evaluate_postprocessed(x, labels, pp, ks=(1, 2, 4), nmi=True)
    assert_metrics_equal(result, expected)
    assert result['nmi'] == normalized_mutual_info(q, labels)  # NMI of the processed query vectors
    assert result['num_gallery'] == 64 and result['num_queries_without_positive'] == 0


def test_query_vs_gallery_steps_leave_the_queries_out_of_dba():
    x, labels = clustered(5, 4, seed=5)
    g, gl = clustered(5, 10, seed=6)
    pp = PostProcess(qe=3, qe_alpha=1.0, dba=4)
    q2, g2 = composed(x, None, 4, 3, 1.0, gallery=g)
    np.testing.assert_array_equal(pp.transform(x, g)[0], q2)
    expected = reference_metrics(-(q2.astype(np.float64) @ g2.T.astype(np.float64)), labels, gl, (1, 5), False)
    assert_metrics_equal(evaluate_postprocessed(x, labels, pp, ks=(1, 5), gallery_embeddings=g, gallery_labels=gl),
                         expected)


# ---------------------------------------------------------------------------------------------- re-ranking

@pytest.mark.parametrize('dense', [True, False])
@pytest.mark.parametrize('steps', ['rerank only', 'all steps'])
def test_reranked_metrics_equal_the_reference_from_the_dense_distance_matrix(dense, steps, monkeypatch):
    if not dense:  # the sparse re-ranking, which equals the dense one up to exact ties (none in this data)
        monkeypatch.setattr(postprocess_module, 'DENSE_RERANK_MAX_ITEMS', 0)
    # one large class: R = 29 > max(ks), so MAP@R reads 29 ranks of the re-ranked lists
    x, labels = clustered(6, [30, 6, 6, 6, 6, 6], seed=7)
    whitening = Whitening.fit_learned(*clustered(6, 10, seed=8), dim=12) if steps == 'all steps' else None
    qe, dba = (2, 3) if steps == 'all steps' else (0, 0)
    pp = PostProcess(whitening, qe=qe, qe_alpha=3.0, dba=dba, rerank=(6, 3, 0.3))
    q, g = composed(x, whitening, dba, qe, 3.0)
    if qe:  # expanded queries are a query set of their own: re-ranked among Q + G items, own item dropped
        distance = k_reciprocal_rerank_dense(q, g, 6, 3, 0.3)
    else:
        distance = k_reciprocal_rerank_dense(q, g, 6, 3, 0.3, query_vs_rest=True)
    expected = reference_metrics(distance, labels, labels, (1, 2), exclude_self=True)
    result = evaluate_postprocessed(x, labels, pp, ks=(1, 2))
    assert_metrics_equal(result, expected)
    assert result['num_queries'] == len(x)
    # and the search lists are the reference ranking with the query itself left out
    scores, ids = pp.search(x, k=40)
    for i in range(len(x)):
        order = [j for j in np.argsort(distance[i], kind='stable') if j != i][:40]
        assert ids[i].tolist() == order
        np.testing.assert_allclose(-scores[i], distance[i, order], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('dense', [True, False])
def test_reranked_query_vs_gallery_matches_the_reference(dense, monkeypatch):
    if not dense:
        monkeypatch.setattr(postprocess_module, 'DENSE_RERANK_MAX_ITEMS', 0)
    x, labels = clustered(4, 5, seed=9)
    g, gl = clustered(4, 15, seed=10)
    pp = PostProcess(rerank=(5, 2, 0.2))
    distance = k_reciprocal_rerank_dense(x, g, 5, 2, 0.2)
    expected = reference_metrics(distance, labels, gl, (1, 3), exclude_self=False)
    assert_metrics_equal(evaluate_postprocessed(x, labels, pp, ks=(1, 3), gallery_embeddings=g, gallery_labels=gl),
                         expected)


def test_search_without_reranking_excludes_the_query_itself_and_clips_k():
    x, _ = clustered(3, 4, seed=11)
    duplicate = np.concatenate([x, x[:1]])  # item 12 is an exact copy of item 0: it still ranks for query 0
    scores, ids = PostProcess(qe=1).search(duplicate, k=50)
    assert ids.shape == (13, 12) and not (ids == np.arange(13)[:, None]).any()
    assert ids[0, 0] == 12 or ids[12, 0] == 0
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    with pytest.raises(ValueError, match='at least 2'):
        PostProcess().search(x[:1])


# ---------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize('kwargs, error, match', [
    ({'qe': -1}, ValueError, 'qe must be an int >= 0'),
    ({'qe': 1.5}, TypeError, 'qe must be'),
    ({'qe_alpha': -1.0}, ValueError, 'qe_alpha must be a real number >= 0'),
    ({'dba': -2}, ValueError, 'dba must be an int >= 0'),
    ({'rerank': (20, 6)}, TypeError, r'rerank must be None or a \(k1, k2, lambda\)'),
    ({'rerank': (0, 6, 0.3)}, ValueError, 'rerank k1 must be a positive int'),
    ({'rerank': (20, 6, 1.5)}, ValueError, r'rerank lambda must be a real number in \[0.0, 1.0\]'),
    ({'whitening': 'path/to/whitening'}, TypeError, 'whitening must be a Whitening or None'),
])
def test_bad_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        PostProcess(**kwargs)


def test_evaluate_postprocessed_refuses_a_non_pipeline_and_a_whitening_of_another_dim():
    x, labels = clustered(3, 4, seed=12)
    with pytest.raises(TypeError, match='postprocess must be a PostProcess'):
        evaluate_postprocessed(x, labels, {'qe': 1})
    other = Whitening.fit_pca(clustered(3, 10, dim=8, seed=13)[0])
    with pytest.raises(ValueError, match='8 columns'):
        evaluate_postprocessed(x, labels, PostProcess(other))
    assert PostProcess(rerank=[20, 6, 0]).rerank == (20, 6, 0.0)


# ----------------------------------------------------------------------------------------- RetrievalIndex

def test_index_with_whitening_whitens_added_and_query_vectors_and_saves_it(tmp_path):
    x, _ = clustered(6, 10, seed=14)
    config = {'model_name': 'test_resnet', 'embed_dim': 16}
    fitted = Whitening.fit_pca(x, dim=6)
    whitening = Whitening(fitted.mean, fitted.projection, 'pca', 1.0, model_fingerprint(config))
    index = RetrievalIndex.build(x[:40], labels=list(range(40)), metadata={'model': config}, whitening=whitening)
    index.add(x[40:])
    assert (index.dim, index.input_dim, len(index)) == (6, 16, 60)
    scores, ids = index.search(x[:5], k=4)
    reference = RetrievalIndex.build(whitening.apply(x)).search(whitening.apply(x[:5]), k=4)
    np.testing.assert_array_equal(ids, reference[1])
    np.testing.assert_allclose(scores, reference[0], atol=1e-6)

    index.save(tmp_path / 'idx')
    index.save(tmp_path / 'idx')  # the second save replaces the first whitening folder
    info = json.loads((tmp_path / 'idx' / 'index.json').read_text())
    assert info['format_version'] == 2 and info['whitening']['fingerprint'] == model_fingerprint(config)
    assert sorted(p.name for p in (tmp_path / 'idx').iterdir() if p.name.startswith('whitening.')) == \
        [info['whitening']['folder']]
    loaded = RetrievalIndex.load(tmp_path / 'idx', expected_metadata={'model': config})
    np.testing.assert_array_equal(loaded.whitening.projection, whitening.projection)
    np.testing.assert_array_equal(loaded.search(x[:5], k=4)[1], ids)
    with pytest.raises(ValueError, match='must have dim 16 like the index'):
        loaded.search(whitening.apply(x[:2]), k=1)

    (tmp_path / 'idx' / info['whitening']['folder'] / 'whitening.json').write_text('{}')
    with pytest.raises(ValueError, match='does not match the SHA-256'):
        RetrievalIndex.load(tmp_path / 'idx')
    # a version-1 file (what readers without whitening support take) cannot carry one
    (tmp_path / 'idx' / 'index.json').write_text(json.dumps(dict(info, format_version=1)))
    with pytest.raises(ValueError, match='format_version 1 cannot hold'):
        RetrievalIndex.load(tmp_path / 'idx')
    with pytest.raises(ValueError, match='learned for model fingerprint'):
        RetrievalIndex.build(x, metadata={'model': dict(config, embed_dim=32)}, whitening=whitening)
    with pytest.raises(ValueError, match='different whitenings'):
        ShardedIndex([index, RetrievalIndex.build(x, whitening=Whitening.fit_pca(x[:30], dim=6))])
    assert len(ShardedIndex([index, RetrievalIndex.build(x, whitening=fitted)])) == 120  # the same projection
    with pytest.raises(ValueError, match='different whitenings'):
        ShardedIndex([index, RetrievalIndex.build(whitening.apply(x))])


@pytest.mark.parametrize('index_type, kwargs', [
    ('flat', {}), ('hnsw', {}), ('ivf', {'nlist': 4, 'nprobe': 4}),
    ('ivf', {'nlist': 2, 'nprobe': 2, 'pq_m': 4, 'pq_nbits': 4}),
])
def test_index_query_expansion_uses_the_vectors_the_index_holds(index_type, kwargs):
    x, _ = clustered(8, 40, seed=15)
    queries = unit(x[:6] + 0.2)
    index = RetrievalIndex.build(x, index_type=index_type, **kwargs)
    scores, ids = index.search(queries, k=5, qe=3, qe_alpha=3.0)
    # reference: alpha-QE over the index's own top 3, with the vectors it stores (IVF-PQ: decoded codes)
    top_scores, top_ids = index.search(queries, k=3)
    if index_type == 'ivf':
        import faiss
        faiss.extract_index_ivf(index.faiss_index).make_direct_map()
    stored = index.faiss_index.reconstruct_n(0, len(index))
    weights = np.maximum(top_scores.astype(np.float64), 0) ** 3.0
    expanded = unit(queries + np.einsum('qn,qnd->qd', weights, stored[top_ids]))
    ref_scores, ref_ids = index.search(expanded, k=5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    if index_type == 'flat':  # exact: the same as query_expansion over the gallery
        np.testing.assert_array_equal(ids, index.search(query_expansion(queries, x, 3, 3.0), k=5)[1])
    with pytest.raises(ValueError, match='qe must be an int >= 0'):
        index.search(queries, qe=-1)


def test_model_fingerprint_hashes_mac_configs_and_keeps_finite_ones():
    import hashlib
    import json
    finite = {'model_name': 'test_resnet', 'descriptors': 'SG', 'gem_p': 3.0, 'embed_dim': 16}
    # the reference: sha256 of the sorted compact JSON, as before non-finite values were handled
    text = json.dumps(finite, sort_keys=True, separators=(',', ':'))
    assert model_fingerprint(finite) == 'sha256:' + hashlib.sha256(text.encode()).hexdigest()
    mac = dict(finite, gem_p=float('inf'))  # --gem-p inf (MAC) in an off-the-shelf config
    assert model_fingerprint(mac).startswith('sha256:') and model_fingerprint(mac) != model_fingerprint(finite)
    assert model_fingerprint(mac) == model_fingerprint(dict(mac))
