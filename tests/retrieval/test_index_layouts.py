"""Saved index folders hold one index at a time, and what a saved index would refuse is refused before the work:
the review fixes of stop 35 (each test fails on the code before them)."""
import errno
import os
import shutil

import faiss
import numpy as np
import pytest
import torch

from cgd_heads import EmbeddingUnits, RetrievalIndex, ShardedIndex, Whitening, build_index_from_units, load_index
from cgd_heads.cli.index import main as index_main
from cgd_heads.retrieval.extract import save_embeddings
from cgd_heads.retrieval.unit_index import save_index


def _unit_rows(n, d=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _units(directory, x, unit_size=100):
    units = EmbeddingUnits.create(directory, len(x), unit_size, 'synthetic-model', 'synthetic-list')
    for u in range(units.num_units):
        start, stop = units.unit_range(u)
        units.write_unit(u, x[start:stop], [i % 5 for i in range(start, stop)],
                         [f'old{i}.jpg' for i in range(start, stop)])
    return units


def test_an_index_saved_over_shards_replaces_them_and_both_layouts_are_refused(tmp_path):
    units = _units(tmp_path / 'units', _unit_rows(300))
    out = tmp_path / 'index'
    build_index_from_units(units, out, 'flat', shard_size=100)
    assert isinstance(load_index(out), ShardedIndex)
    new = _unit_rows(50, seed=1)
    RetrievalIndex.build(new, paths=[f'new{i}.jpg' for i in range(50)]).save(out)  # the plain save leaves shards
    with pytest.raises(ValueError, match='holds two saved indexes'):
        load_index(out)  # it cannot tell which one is current: never the old gallery, silently
    save_index(RetrievalIndex.build(new, paths=[f'new{i}.jpg' for i in range(50)]), out)
    index = load_index(out)
    assert isinstance(index, RetrievalIndex) and not (out / 'shards.json').exists()
    assert not [p for p in out.iterdir() if p.name.startswith('shard-')]
    assert index.search_hits(new[:1], 1)[0][0].path == 'new0.jpg'


def test_cgd_index_over_a_sharded_folder_searches_the_new_gallery(tmp_path):
    _units(tmp_path / 'units', _unit_rows(300))
    out = str(tmp_path / 'index')
    assert index_main(['--units', str(tmp_path / 'units'), '--out', out, '--shard-size', '100',
                       '--device', 'cpu']) == 0
    new = _unit_rows(50, seed=1)
    save_embeddings(tmp_path / 'new.safetensors', torch.from_numpy(new), None, [f'new{i}.jpg' for i in range(50)], {})
    assert index_main(['--embeddings', str(tmp_path / 'new.safetensors'), '--out', out]) == 0
    index = load_index(out)
    assert len(index) == 50 and index.search_hits(new[:1], 1)[0][0].path == 'new0.jpg'


@pytest.mark.parametrize('bad', ['scaled', 'nan'])
def test_ivf_from_units_checks_the_vectors_like_every_other_build(bad, tmp_path):
    x = _unit_rows(300)
    if bad == 'scaled':
        x = x * 5
    else:
        x[5, 0] = np.nan
    units = _units(tmp_path / 'units', x)
    message = 'must be L2-normalised' if bad == 'scaled' else 'must be finite'
    for index_type, options in (('ivf', {'nlist': 2}), ('flat', {})):
        with pytest.raises(ValueError, match=message):
            build_index_from_units(units, tmp_path / index_type, index_type, **options)


def test_metadata_and_whitening_are_refused_before_any_vector_is_read_and_nothing_is_left(tmp_path, monkeypatch):
    x = _unit_rows(300)
    units = _units(tmp_path / 'units', x)
    read = []
    original = EmbeddingUnits.read_unit
    monkeypatch.setattr(EmbeddingUnits, 'read_unit', lambda self, u: read.append(u) or original(self, u))
    out = tmp_path / 'index'
    with pytest.raises(TypeError, match='JSON-serialisable'):
        build_index_from_units(units, out, 'ivf', on_disk=True, shard_size=100, nlist=2,
                               metadata={'note': float('nan')})
    other = Whitening.fit_pca(x, dim=4)
    other.fingerprint = 'another-model'
    with pytest.raises(ValueError, match='learned for model fingerprint'):
        build_index_from_units(units, out, 'ivf', on_disk=True, shard_size=100, nlist=2, whitening=other,
                               metadata={'model': {'model_name': 'm'}})
    with pytest.raises(ValueError, match='takes 4-d vectors'):
        build_index_from_units(units, out, 'flat', whitening=Whitening.fit_pca(_unit_rows(50, d=4), dim=2))
    assert read == [] and (not out.exists() or list(out.iterdir()) == [])


def test_a_failed_merge_or_copy_leaves_no_lists_file(tmp_path, monkeypatch):
    units = _units(tmp_path / 'units', _unit_rows(300))
    out = tmp_path / 'index'

    def broken_merge(index, parts, target):
        target.write_bytes(b'half a lists file')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr('cgd_heads.retrieval.unit_index.merge_on_disk', broken_merge)
    with pytest.raises(OSError, match='No space'):
        build_index_from_units(units, out, 'ivf', on_disk=True, shard_size=100, nlist=2)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    index = load_index(build_index_from_units(units, out, 'ivf', on_disk=True, shard_size=100, nlist=2))

    def no_link(*args):
        raise OSError(errno.EXDEV, 'cross-device link')

    def half_copy(source, target):
        with open(target, 'wb') as f:
            f.write(b'x' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(os, 'link', no_link)
    monkeypatch.setattr(shutil, 'copyfile', half_copy)
    with pytest.raises(OSError, match='No space'):
        index.save(tmp_path / 'elsewhere')
    assert [p.name for p in (tmp_path / 'elsewhere').iterdir()] == []


def test_index_options_that_would_not_apply_or_disagree_with_the_faiss_index_are_refused():
    x = _unit_rows(100)
    with pytest.raises(ValueError, match='pq_nbits=4 needs pq_m'):
        RetrievalIndex.build(x, index_type='ivf', nlist=2, pq_nbits=4)
    hnsw = faiss.IndexHNSWFlat(8, 16, faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match='M=32 but the faiss index has M=16'):
        RetrievalIndex(hnsw, 'hnsw', [], [], params={'M': 32, 'ef_construction': 40, 'ef_search': 64})
    flat_lists = faiss.index_factory(8, 'IVF2,Flat', faiss.METRIC_INNER_PRODUCT)
    flat_lists.train(x)
    with pytest.raises(ValueError, match='no PQ'):
        RetrievalIndex(flat_lists, 'ivf', [], [], params={'nlist': 2, 'nprobe': 2, 'pq_m': 4, 'pq_nbits': 8})
    untrained = faiss.index_factory(8, 'IVF2,Flat', faiss.METRIC_INNER_PRODUCT)
    with pytest.raises(ValueError, match='not trained'):
        RetrievalIndex(untrained, 'ivf', [], [], params={'nlist': 2, 'nprobe': 2, 'pq_m': None, 'pq_nbits': 8})
    built = RetrievalIndex.build(x, index_type='ivf', nlist=2, pq_m=4, pq_nbits=4)
    assert built.params['pq_m'] == 4 and faiss.downcast_index(built.faiss_index).pq.nbits == 4
    flat_ivf = RetrievalIndex.build(x, index_type='ivf', nlist=2)  # records pq_m=None, pq_nbits=8 (the default)
    assert RetrievalIndex.build(x, index_type='ivf', **flat_ivf.params).params == flat_ivf.params
    with pytest.raises(TypeError, match="on_disk must be True or False, got str 'no'"):
        build_index_from_units('unused', 'unused', 'ivf', on_disk='no')


def test_an_empty_index_returns_no_columns():
    empty = RetrievalIndex(faiss.IndexFlatIP(8), 'flat', [], [])
    scores, ids = empty.search(_unit_rows(3), 5)
    assert scores.shape == ids.shape == (3, 0) and scores.dtype == np.float32 and ids.dtype == np.int64
    assert empty.search_hits(_unit_rows(2), 5, qe=2) == [[], []]


def test_a_unit_of_another_dimension_is_refused_when_written(tmp_path):
    units = EmbeddingUnits.create(tmp_path / 'units', 200, 100, 'synthetic-model', 'synthetic-list')
    units.write_unit(0, _unit_rows(100, d=8), [0] * 100)
    with pytest.raises(ValueError, match='unit 1 holds 4-d embeddings, but the units of .* hold 8-d ones'):
        units.write_unit(1, _unit_rows(100, d=4), [0] * 100)  # was a bare faiss / numpy error when indexing
    units.write_unit(0, _unit_rows(100, d=8, seed=1), [0] * 100)  # a rewrite of the same dimension is fine
