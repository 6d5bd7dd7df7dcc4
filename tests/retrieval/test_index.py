"""RetrievalIndex: exact search against torch top-k, approximate recall, persistence and its failure modes."""
import importlib
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

import cgd_heads.retrieval.index as index_module
import cgd_heads.retrieval.index_file as index_file
from cgd_heads.retrieval.arrays import to_embedding_array
from cgd_heads.retrieval.index import METADATA_FILE, RetrievalIndex, SearchHit


def unit(n: int, dim: int = 32, seed: int = 0, clusters: int = 0) -> torch.Tensor:
    """n random unit vectors; with ``clusters`` > 0 scattered around that many random centres."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    if clusters:
        x = torch.randn(clusters, dim, generator=g)[torch.randint(0, clusters, (n,), generator=g)] + 0.7 * x
    return torch.nn.functional.normalize(x, dim=1)


def brute_topk(queries: torch.Tensor, items: torch.Tensor, k: int):
    scores, ids = torch.topk(queries.double() @ items.double().T, k, dim=1)
    return scores, ids


def recall_vs_exact(ids: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact)]))


@pytest.fixture(scope='module')
def clustered():
    return unit(3000, clusters=40, seed=1)


class TestSearch:
    def test_flat_equals_brute_force(self):
        items, queries = unit(500, seed=2), unit(20, seed=3)
        scores, ids = RetrievalIndex.build(items).search(queries, k=7)
        ref_scores, ref_ids = brute_topk(queries, items, 7)
        assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (20, 7)
        np.testing.assert_array_equal(ids, ref_ids.numpy())
        np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-6)

    @pytest.mark.parametrize('index_type, kwargs, threshold', [
        ('hnsw', {}, 0.95),
        ('hnsw', {'M': 8, 'ef_construction': 20, 'ef_search': 16}, 0.8),
        ('ivf', {}, 0.9),
        ('ivf', {'nlist': 32, 'nprobe': 4}, 0.8),
        ('ivf', {'pq_m': 16, 'pq_nbits': 5}, 0.65),  # 5-bit codes: k-means with 32 centroids, fast to train
    ])
    def test_approximate_recall_at_10(self, clustered, index_type, kwargs, threshold):
        queries = clustered[:300]
        exact = RetrievalIndex.build(clustered).search(queries, 10)[1]
        index = RetrievalIndex.build(clustered, index_type=index_type, **kwargs)
        assert isinstance(index.faiss_index, {'hnsw': faiss.IndexHNSW, 'ivf': faiss.IndexIVF}[index_type])
        assert index.faiss_index.metric_type == faiss.METRIC_INNER_PRODUCT
        assert recall_vs_exact(index.search(queries, 10)[1], exact) >= threshold

    def test_search_hits_carry_labels_and_paths(self):
        items = unit(50, seed=4)
        labels = [i % 5 for i in range(50)]
        paths = [Path(f'/data/img{i}.jpg') for i in range(50)]
        index = RetrievalIndex.build(items, labels=labels, paths=paths)
        scores, ids = index.search(items[:3], k=4)
        hits = index.search_hits(items[:3], k=4)
        assert [[h.id for h in row] for row in hits] == ids.tolist()
        assert hits[0][0] == SearchHit(0, pytest.approx(1.0, abs=1e-6), 0, '/data/img0.jpg')
        for row_hits, row_scores in zip(hits, scores):
            for hit, score in zip(row_hits, row_scores):
                assert (hit.label, hit.path, hit.score) == (labels[hit.id], f'/data/img{hit.id}.jpg', float(score))

    def test_k_is_clipped_to_size(self):
        index = RetrievalIndex.build(unit(5, seed=5))
        scores, ids = index.search(unit(2, seed=6), k=10)
        assert ids.shape == (2, 5) and sorted(ids[0].tolist()) == list(range(5))

    def test_missing_slots_are_minus_one_and_dropped_from_hits(self):
        # 2 of 8 lists probed: a query sees only the items in those lists, fewer than k = 200
        items = unit(200, seed=7, clusters=8)
        index = RetrievalIndex.build(items, index_type='ivf', nlist=8, nprobe=2)
        scores, ids = index.search(items[:4], k=200)
        missing = ids == -1
        assert missing.any() and (missing.sum(axis=1) < 200).all()
        assert np.isneginf(scores[missing]).all() and np.isfinite(scores[~missing]).all()
        assert [len(row) for row in index.search_hits(items[:4], k=200)] == (~missing).sum(axis=1).tolist()

    def test_add_extends_ids_labels_and_paths(self):
        a, b = unit(30, seed=8), unit(20, seed=9)
        index = RetrievalIndex.build(a, labels=[1] * 30, paths=None)
        index.add(b, labels=np.full(20, 2), paths=[f'b{i}' for i in range(20)])
        assert len(index) == 50 and index.dim == 32
        assert index.labels == [1] * 30 + [2] * 20
        assert index.paths == [None] * 30 + [f'b{i}' for i in range(20)]
        ref_ids = brute_topk(b[:5], torch.cat([a, b]), 3)[1]
        np.testing.assert_array_equal(index.search(b[:5], 3)[1], ref_ids.numpy())

    def test_set_search_params(self, clustered):
        index = RetrievalIndex.build(clustered[:1000], index_type='ivf', nlist=16, nprobe=1)
        index.set_search_params(nprobe=16)  # all lists probed: exact
        exact = RetrievalIndex.build(clustered[:1000]).search(clustered[:50], 10)[1]
        assert recall_vs_exact(index.search(clustered[:50], 10)[1], exact) == 1.0
        with pytest.raises(ValueError, match='nprobe must be <= nlist'):
            index.set_search_params(nprobe=17)
        with pytest.raises(TypeError, match='ef_search'):
            index.set_search_params(ef_search=10)


class TestValidation:
    def test_non_unit_and_normalize(self):
        x = unit(40, seed=10) * 3.0
        with pytest.raises(ValueError, match=r'row 0 has norm 3.*normalize=True'):
            RetrievalIndex.build(x)
        index = RetrievalIndex.build(x, normalize=True)
        reference = RetrievalIndex.build(x / 3.0)
        np.testing.assert_array_equal(index.search(x[:3] / 3.0, 2)[1], reference.search(x[:3] / 3.0, 2)[1])
        assert torch.allclose(x.norm(dim=1), torch.full((40,), 3.0)), 'input must not be modified'
        with pytest.raises(ValueError, match='row 1 is all zeros'):
            to_embedding_array(np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), normalize=True)

    @pytest.mark.parametrize('bad, match', [
        (np.array([[1.0, 0.0], [np.nan, 0.0]], np.float32), 'row 1 contains NaN or inf'),
        (np.array([[1.0, 0.0], [np.inf, 0.0]], np.float32), 'row 1 contains NaN or inf'),
        (np.zeros((0, 4), np.float32), 'non-empty'),
        (np.ones(4, np.float32), '2-D'),
    ])
    def test_bad_embeddings(self, bad, match):
        with pytest.raises(ValueError, match=match):
            RetrievalIndex.build(bad)

    def test_bad_arguments(self):
        x = unit(100, seed=11)
        with pytest.raises(ValueError, match="index_type must be one of .* got 'annoy'"):
            RetrievalIndex.build(x, index_type='annoy')
        with pytest.raises(TypeError, match=r"takes no index options, got \['nlist'\]"):
            RetrievalIndex.build(x, nlist=4)
        with pytest.raises(TypeError, match=r"unknown \['efSearch'\]"):
            RetrievalIndex.build(x, index_type='hnsw', efSearch=4)
        with pytest.raises(ValueError, match='too few embeddings to train an IVF index: got 100, need at least 200'):
            RetrievalIndex.build(x, index_type='ivf', nlist=200)
        with pytest.raises(ValueError, match='need at least 256'):
            RetrievalIndex.build(x, index_type='ivf', nlist=2, pq_m=4)
        with pytest.raises(ValueError, match='pq_m must divide the embedding dim 32, got 5'):
            RetrievalIndex.build(x, index_type='ivf', nlist=2, pq_m=5)
        with pytest.raises(ValueError, match=r'labels must have one entry per embedding \(100\), got 3'):
            RetrievalIndex.build(x, labels=[1, 2, 3])
        with pytest.raises(TypeError, match=r"labels\[1\] must be an int or None, got str 'b'"):
            RetrievalIndex.build(x[:2], labels=[1, 'b'])
        with pytest.raises(TypeError, match='metadata must be JSON-serialisable'):
            RetrievalIndex.build(x, metadata={'model': object()})
        index = RetrievalIndex.build(x)
        with pytest.raises(ValueError, match=r'queries must have dim 32 like the index, got shape \(1, 8\)'):
            index.search(unit(1, dim=8), 3)
        with pytest.raises(ValueError, match='k must be a positive int, got 0'):
            index.search(x[:1], 0)
        with pytest.raises(ValueError, match='embeddings must have dim 32'):
            index.add(unit(2, dim=16))


class TestPersistence:
    @pytest.mark.parametrize('index_type, kwargs', [
        ('flat', {}),
        ('hnsw', {'ef_search': 20}),
        ('ivf', {'nlist': 16, 'nprobe': 3}),
        ('ivf', {'nlist': 4, 'pq_m': 8, 'pq_nbits': 5}),
    ])
    def test_round_trip(self, tmp_path, clustered, index_type, kwargs):
        items = clustered[:1000]
        labels = [i % 7 if i % 3 else None for i in range(1000)]
        paths = [f'img/{i}.png' if i % 2 else None for i in range(1000)]
        meta = {'backbone': 'resnet50', 'descriptors': 'SG', 'embed_dim': 32, 'mean': (0.485, 0.456, 0.406)}
        index = RetrievalIndex.build(items, labels, paths, index_type, meta, **kwargs)
        index.save(tmp_path / 'idx')
        loaded = RetrievalIndex.load(tmp_path / 'idx', expected_metadata=meta)
        assert (len(loaded), loaded.dim, loaded.index_type, loaded.metric) == (1000, 32, index_type, 'inner_product')
        assert loaded.labels == labels and loaded.paths == paths and loaded.params == index.params
        assert loaded.metadata == {**meta, 'mean': [0.485, 0.456, 0.406]}
        queries = clustered[1000:1100]
        for got, want in zip(loaded.search(queries, 10), index.search(queries, 10)):
            np.testing.assert_array_equal(got, want)
        assert loaded.search_hits(queries, 3) == index.search_hits(queries, 3)
        files = sorted(p.name for p in (tmp_path / 'idx').iterdir())
        assert len(files) == 2 and files[1] == METADATA_FILE and files[0].endswith('.faiss')

    def test_resave_replaces_previous_files(self, tmp_path):
        index = RetrievalIndex.build(unit(10, seed=12))
        index.save(tmp_path)
        index.add(unit(5, seed=13))
        index.save(tmp_path)
        assert len(list(tmp_path.glob('*.faiss'))) == 1
        assert len(RetrievalIndex.load(tmp_path)) == 15

    @staticmethod
    def saved(tmp_path: Path):
        index = RetrievalIndex.build(unit(20, seed=14), labels=list(range(20)), metadata={'backbone': 'resnet50'})
        index.save(tmp_path)
        info = json.loads((tmp_path / METADATA_FILE).read_text())
        return info, tmp_path / info['index_file']

    def edit(self, tmp_path: Path, **changes) -> None:
        info, _ = self.saved(tmp_path)
        (tmp_path / METADATA_FILE).write_text(json.dumps({**info, **changes}))

    def test_tampered_count_is_refused(self, tmp_path):
        self.edit(tmp_path, count=21)
        with pytest.raises(ValueError, match='has 20 labels but count=21'):
            RetrievalIndex.load(tmp_path)
        # consistent json, but the faiss file holds 20 vectors
        self.edit(tmp_path, count=21, labels=list(range(21)), paths=[None] * 21)
        with pytest.raises(ValueError, match='holds 20 vectors but .*index.json says count=21'):
            RetrievalIndex.load(tmp_path)

    def test_tampered_dim_is_refused(self, tmp_path):
        self.edit(tmp_path, dim=64)
        with pytest.raises(ValueError, match='has dim 32 but .*index.json says dim=64'):
            RetrievalIndex.load(tmp_path)

    @pytest.mark.parametrize('changes, match', [
        ({'format_version': 99}, 'format_version 99'),
        ({'metric': 'l2'}, "metric must be 'inner_product'"),
        ({'index_file': '../elsewhere.faiss'}, 'must be a file name in the same folder'),
        ({'labels': 'oops'}, "field 'labels' must be a list"),
        ({'params': {'nprobe': 3}}, 'params for index_type'),
    ])
    def test_other_tampering_is_refused(self, tmp_path, changes, match):
        self.edit(tmp_path, **changes)
        with pytest.raises(ValueError, match=match):
            RetrievalIndex.load(tmp_path)

    def test_missing_and_corrupt_files(self, tmp_path):
        with pytest.raises(FileNotFoundError, match='index.json does not exist'):
            RetrievalIndex.load(tmp_path)
        _, faiss_file = self.saved(tmp_path)
        data = bytearray(faiss_file.read_bytes())
        data[-1] ^= 0xFF
        faiss_file.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=f'{faiss_file.name} does not match the SHA-256'):
            RetrievalIndex.load(tmp_path)
        faiss_file.unlink()
        with pytest.raises(FileNotFoundError, match=f'refers to faiss file .*{faiss_file.name}'):
            RetrievalIndex.load(tmp_path)
        (tmp_path / METADATA_FILE).write_text('{"format_version": 1, ')
        with pytest.raises(ValueError, match='index.json is not valid JSON'):
            RetrievalIndex.load(tmp_path)

    def test_unreadable_faiss_file_with_matching_checksum(self, tmp_path):
        info, faiss_file = self.saved(tmp_path)
        faiss_file.write_bytes(b'not a faiss index')
        info['index_sha256'] = index_file.sha256(faiss_file)
        (tmp_path / METADATA_FILE).write_text(json.dumps(info))
        with pytest.raises(ValueError, match='is not a readable faiss index'):
            RetrievalIndex.load(tmp_path)

    def test_expected_metadata_mismatch_names_fields(self, tmp_path):
        self.saved(tmp_path)
        assert len(RetrievalIndex.load(tmp_path, expected_metadata={'backbone': 'resnet50'})) == 20
        with pytest.raises(ValueError, match=r"differing fields: 'backbone' \(index has 'resnet50', expected "
                                             r"'vit_small'\), 'embed_dim' \(missing in the index"):
            RetrievalIndex.load(tmp_path, expected_metadata={'backbone': 'vit_small', 'embed_dim': 512})

    def test_failed_write_index_keeps_previous_save(self, tmp_path, monkeypatch):
        old = RetrievalIndex.build(unit(20, seed=15))
        old.save(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())
        new = RetrievalIndex.build(unit(30, seed=16))

        def broken_write_index(index, path):
            Path(path).write_bytes(b'partial')  # a crash mid-write
            raise RuntimeError('disk full')

        monkeypatch.setattr(faiss, 'write_index', broken_write_index)
        with pytest.raises(RuntimeError, match='disk full'):
            new.save(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, 'no partial or orphaned files'
        loaded = RetrievalIndex.load(tmp_path)
        assert len(loaded) == 20
        np.testing.assert_array_equal(loaded.search(unit(3, seed=17), 5)[1], old.search(unit(3, seed=17), 5)[1])

    def test_failed_json_write_keeps_previous_save(self, tmp_path, monkeypatch):
        RetrievalIndex.build(unit(20, seed=18)).save(tmp_path)
        before = sorted(p.name for p in tmp_path.iterdir())

        def broken_json(path, obj):
            raise OSError('disk full')

        monkeypatch.setattr(index_module, 'atomic_write_json', broken_json)
        with pytest.raises(OSError, match='disk full'):
            RetrievalIndex.build(unit(30, seed=19)).save(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
        assert len(RetrievalIndex.load(tmp_path)) == 20


def test_missing_faiss_fails_at_import(monkeypatch):
    monkeypatch.setitem(sys.modules, 'faiss', None)  # makes `import faiss` raise ImportError
    for name in ('cgd_heads.retrieval.faiss_import', 'cgd_heads.retrieval.index_types', 'cgd_heads.retrieval.index'):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match='pip install faiss-cpu'):
        importlib.import_module('cgd_heads.retrieval.index')
