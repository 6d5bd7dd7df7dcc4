"""Embedding units: every image of a real (generated PNG) image list embedded exactly once and equal to the in-memory
extraction, reruns that keep finished units and redo the rest, the manifest refusing another model / list /
preprocessing, and indexes built from units: streamed IVF-PQ equal to the in-memory build, on-disk inverted lists
that move with their folder, flat shards that give the exact top k. The multi-process runs under torchrun are in
tests/cli/test_cli_units.py."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from cgd_heads import (EmbeddingUnits, RetrievalIndex, ShardedIndex, build_index_from_units, create_model,
                       extract_embeddings, extract_units, load_index, load_units, save_pretrained)
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, read_image_folder
from cgd_heads.retrieval import NO_LABEL, checkpoint_fingerprint, list_fingerprint, weights_fingerprint
from conftest import write_shapes_folder

#: 48 images of 8 classes cut into units of 10: four full units and a last one of 8
UNIT_SIZE = 10
#: the same images in batches of another composition (a unit of 10 vs the whole list of 48) may differ by float
#: rounding in the convolutions: embeddings are compared within this absolute tolerance (unit vectors)
ATOL = 1e-5


@pytest.fixture(scope='module')
def gallery(tmp_path_factory):
    """A tiny test_efficientnet model at 32 px, its dataset over 48 generated PNG images, and the image list."""
    root = tmp_path_factory.mktemp('units')
    images = read_image_folder(write_shapes_folder(root / 'shapes'))['all']
    torch.manual_seed(0)
    model = create_model('test_efficientnet', embed_dim=16).eval()
    data_config = data_config_of(model, 32)
    checkpoint = save_pretrained(model, root / 'checkpoint', extra={'data': data_config})
    dataset = ImageDataset(images, create_cgd_transform(data_config, False, 32))
    return model, dataset, images, checkpoint


def _extract(gallery, directory, **kwargs):
    model, dataset, images, checkpoint = gallery
    kwargs.setdefault('fingerprint', checkpoint_fingerprint(checkpoint))
    return extract_units(model, dataset, directory, images.paths, images.labels, unit_size=UNIT_SIZE,
                         batch_size=4, device='cpu', **kwargs)


def test_every_image_is_embedded_once_in_order_and_equals_the_in_memory_extraction(gallery, tmp_path):
    model, dataset, images, _ = gallery
    units = _extract(gallery, tmp_path / 'units')
    assert (units.num_units, units.count, units.unit_size, units.dim) == (5, 48, UNIT_SIZE, 16)
    assert [units.unit_range(u) for u in range(5)] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 48)]
    read = list(units.iter_units())
    assert [u.index for u in read] == list(range(5)) and [len(u) for u in read] == [10, 10, 10, 10, 8]
    ids = np.concatenate([u.ids for u in read])
    assert ids.tolist() == list(range(48))
    emb, labels, paths, manifest = load_units(tmp_path / 'units')
    expected, expected_labels = extract_embeddings(model, dataset, batch_size=64, device='cpu', progress=False)
    torch.testing.assert_close(emb, expected, rtol=0, atol=ATOL)
    assert labels.tolist() == expected_labels.tolist() == images.labels and paths == images.paths
    assert manifest['list_fingerprint'] == list_fingerprint(images.paths, images.labels)
    assert manifest['preprocessing'] == {'flip': False, 'scales': [1.0], 'amp_dtype': None}


def test_a_rerun_keeps_finished_units_and_redoes_missing_corrupt_and_interrupted_ones(gallery, tmp_path):
    units = _extract(gallery, tmp_path / 'units')
    before = {u: os.stat(units.unit_path(u)).st_mtime_ns for u in range(5)}
    units.unit_path(1).unlink()                                   # never written
    units.unit_path(3).write_bytes(units.unit_path(3).read_bytes()[:100])  # truncated by some other tool
    stale = tmp_path / 'units' / '.unit-000001.safetensors.abc123.tmp'      # a write a SIGKILL interrupted
    stale.write_bytes(b'partial')
    assert units.missing_units() == [1, 3]
    units = _extract(gallery, tmp_path / 'units')
    assert units.missing_units() == [] and not stale.exists()
    after = {u: os.stat(units.unit_path(u)).st_mtime_ns for u in range(5)}
    assert [u for u in range(5) if after[u] != before[u]] == [1, 3]
    assert np.concatenate([u.ids for u in units]).tolist() == list(range(48))


def test_the_manifest_refuses_another_model_list_preprocessing_or_unit_size(gallery, tmp_path):
    model, dataset, images, checkpoint = gallery
    _extract(gallery, tmp_path / 'units')
    with pytest.raises(ValueError, match='units written for another model: differing model_fingerprint'):
        _extract(gallery, tmp_path / 'units', fingerprint=weights_fingerprint(model))
    relabelled = list(images.labels)
    relabelled[0] = 1
    with pytest.raises(ValueError, match='another image list'):
        extract_units(model, dataset, tmp_path / 'units', images.paths, relabelled, unit_size=UNIT_SIZE,
                      fingerprint=checkpoint_fingerprint(checkpoint), device='cpu')
    with pytest.raises(ValueError, match='other preprocessing'):
        _extract(gallery, tmp_path / 'units', flip=True)
    with pytest.raises(ValueError, match='another unit size'):
        extract_units(model, dataset, tmp_path / 'units', images.paths, images.labels, unit_size=7,
                      fingerprint=checkpoint_fingerprint(checkpoint), device='cpu')
    # a unit file of another model dropped into the folder is refused, never mixed in
    other = _extract(gallery, tmp_path / 'other', fingerprint='weights-sha256:another')
    shutil.copyfile(other.unit_path(2), tmp_path / 'units' / other.unit_path(2).name)
    with pytest.raises(ValueError, match=r'unit-000002.safetensors was written by another model'):
        _extract(gallery, tmp_path / 'units')


def test_bad_views_are_refused_before_the_manifest_records_them(gallery, tmp_path):
    for scales, error in (((0.0,), ValueError), ((1.0, float('inf')), ValueError), ((), ValueError),
                          (('1',), TypeError)):
        with pytest.raises(error, match='scales'):
            _extract(gallery, tmp_path / 'units', scales=scales)
    with pytest.raises(TypeError, match="flip must be True or False, got str 'no'"):
        _extract(gallery, tmp_path / 'units', flip='no')
    with pytest.raises(TypeError, match="amp_dtype must be None, torch.bfloat16 or torch.float16, got 'bf16'"):
        _extract(gallery, tmp_path / 'units', amp_dtype='bf16')
    assert not (tmp_path / 'units').exists()  # nothing recorded: a correct rerun is not refused as another setup
    assert sum(_extract(gallery, tmp_path / 'units', scales=np.array([1.0])).unit_counts()) == 48


def test_checkpoint_fingerprint_changes_with_the_weights_or_the_config(gallery, tmp_path):
    model, _, _, checkpoint = gallery
    copy = shutil.copytree(checkpoint, tmp_path / 'copy')
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(checkpoint)
    assert checkpoint_fingerprint(checkpoint).startswith('checkpoint-sha256:')
    config = json.loads((copy / 'config.json').read_text())
    (copy / 'config.json').write_text(json.dumps(dict(config, data=dict(config['data'], img_size=48))))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(checkpoint)
    changed = create_model('test_efficientnet', embed_dim=16)
    assert weights_fingerprint(changed) != weights_fingerprint(model) == weights_fingerprint(model)
    with pytest.raises(FileNotFoundError, match='not a checkpoint folder'):
        checkpoint_fingerprint(tmp_path)


def test_unreadable_images_are_skipped_and_recorded_in_their_unit(gallery, tmp_path):
    model, dataset, images, checkpoint = gallery
    bad = {13: 'cannot decode', 40: 'truncated'}
    units = _extract(gallery, tmp_path / 'units', check_item=bad.get)
    unit = units.read_unit(1)
    assert unit.skipped == [(13, 'cannot decode')] and 13 not in unit.ids.tolist() and len(unit) == 9
    emb, labels, paths, _ = load_units(tmp_path / 'units')
    assert len(emb) == len(paths) == 46 and images.paths[13] not in paths and images.paths[40] not in paths


def _clustered(n=1200, d=32, clusters=24, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    labels = rng.integers(0, clusters, n)
    x = centers[labels] + 0.6 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _write_units(directory, x, labels, unit_size=150):
    units = EmbeddingUnits.create(directory, len(x), unit_size, 'synthetic-model', 'synthetic-list')
    for u in range(units.num_units):
        start, stop = units.unit_range(u)
        units.write_unit(u, x[start:stop], labels[start:stop], [f'item{i}.jpg' for i in range(start, stop)])
    return units


def _recall_at_10(ids, exact):
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])


def test_streamed_ivfpq_equals_the_in_memory_build_and_keeps_its_recall_on_a_sample(tmp_path):
    x, labels = _clustered()
    units = _write_units(tmp_path / 'units', x, labels)
    options = dict(nlist=16, nprobe=4, pq_m=8, pq_nbits=6)
    memory = RetrievalIndex.build(x, labels, index_type='ivf', **options)
    # trained on all vectors (the sample, sorted, is then the whole gallery in order): the same index exactly
    streamed = load_index(build_index_from_units(units, tmp_path / 'all', 'ivf', train_size=len(x), **options))
    queries = x[::7]
    for (s1, i1), (s2, i2) in [(memory.search(queries, 10), streamed.search(queries, 10))]:
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, rtol=0, atol=1e-6)
    assert streamed.labels == labels.tolist() and streamed.paths[5] == 'item5.jpg'
    assert streamed.params == memory.params and streamed.metadata['units']['count'] == len(x)
    # trained on a bounded sample (a third): the recall against the exact top 10 stays that of the full build
    exact = np.argsort(-(queries @ x.T), axis=1, kind='stable')[:, :10]
    sampled = load_index(build_index_from_units(units, tmp_path / 'sample', 'ivf', train_size=400, **options))
    full_recall, sample_recall = (_recall_at_10(index.search(queries, 10)[1], exact) for index in (memory, sampled))
    assert sample_recall >= full_recall - 0.05, (sample_recall, full_recall)


@pytest.mark.parametrize('index_type, options', [('flat', {}), ('ivf', dict(nlist=8)),
                                                ('ivf', dict(nlist=8, on_disk=True, shard_size=300))])
def test_units_without_labels_give_an_index_without_labels(index_type, options, tmp_path):
    x, labels = _clustered(n=600)
    some = np.where(np.arange(600) % 3 == 0, NO_LABEL, labels)  # a gallery labelled in part
    for name, stored in (('none', np.full(600, NO_LABEL)), ('some', some)):
        units = _write_units(tmp_path / f'units_{name}', x, stored)
        index = load_index(build_index_from_units(units, tmp_path / f'index_{name}', index_type, **options))
        if isinstance(index, ShardedIndex):
            got = [label for shard in index.shards for label in shard.labels]
        else:
            got = index.labels
        assert got == [None if label == NO_LABEL else int(label) for label in stored]
        emb, loaded, paths, _ = load_units(tmp_path / f'units_{name}')
        # all unlabelled: None, as load_embeddings gives for a file without labels (one class would score 100%)
        assert loaded is None if name == 'none' else loaded.tolist() == stored.tolist()
        np.testing.assert_array_equal(emb.numpy(), x)
    with pytest.raises(ValueError, match=r'labels must be >= 0, or NO_LABEL \(-1\) for an image without one, got -2'):
        _write_units(tmp_path / 'bad', x, np.full(600, -2))


def test_on_disk_lists_are_saved_moved_loaded_and_searched(tmp_path):
    x, labels = _clustered()
    units = _write_units(tmp_path / 'units', x, labels)
    options = dict(nlist=16, nprobe=4, pq_m=8, pq_nbits=6)
    memory = load_index(build_index_from_units(units, tmp_path / 'memory', 'ivf', train_size=len(x), **options))
    build_index_from_units(units, tmp_path / 'disk', 'ivf', train_size=len(x), on_disk=True, shard_size=500, **options)
    info = json.loads((tmp_path / 'disk' / 'index.json').read_text())
    assert info['format_version'] == 3 and (tmp_path / 'disk' / info['ivfdata']['file']).is_file()
    shutil.move(str(tmp_path / 'disk'), str(tmp_path / 'elsewhere'))  # the lists file travels with the folder
    moved = load_index(tmp_path / 'elsewhere')
    queries = x[::11]
    np.testing.assert_array_equal(moved.search(queries, 10)[1], memory.search(queries, 10)[1])
    assert moved.labels == labels.tolist() and len(moved) == len(x)
    moved.set_search_params(nprobe=8)
    moved.save(tmp_path / 'elsewhere')  # saved again in place: a new faiss file, the same lists file
    assert sorted(p.suffix for p in (tmp_path / 'elsewhere').iterdir()) == ['.faiss', '.ivfdata', '.json']
    assert load_index(tmp_path / 'elsewhere').params['nprobe'] == 8
    moved.save(tmp_path / 'copy')  # saving elsewhere brings its own lists file
    shutil.rmtree(tmp_path / 'elsewhere')
    memory.set_search_params(nprobe=8)
    np.testing.assert_array_equal(load_index(tmp_path / 'copy').search(queries, 10)[1], memory.search(queries, 10)[1])
    with pytest.raises(ValueError, match='read-only'):
        moved.add(x[:2])
    lists = tmp_path / 'copy' / json.loads((tmp_path / 'copy' / 'index.json').read_text())['ivfdata']['file']
    with open(lists, 'ab') as f:
        f.write(b'x')
    with pytest.raises(ValueError, match='corrupt or replaced'):
        load_index(tmp_path / 'copy')


def test_flat_shards_give_the_exact_top_k_and_replace_a_single_index(tmp_path):
    x, labels = _clustered(n=700)
    units = _write_units(tmp_path / 'units', x, labels, unit_size=100)
    out = tmp_path / 'index'
    build_index_from_units(units, out, 'ivf', nlist=4)
    assert isinstance(load_index(out), RetrievalIndex)
    build_index_from_units(units, out, 'flat', shard_size=250)  # units of 100: shards of 200, 200, 200, 100
    assert not (out / 'index.json').exists() and sorted(p.name for p in out.iterdir())[-1] == 'shards.json'
    sharded = load_index(out)
    assert isinstance(sharded, ShardedIndex) and [len(s) for s in sharded.shards] == [200, 200, 200, 100]
    queries = x[::9]
    scores, shard_ids, ids = sharded.search(queries, 10)
    offsets = np.array([0, 200, 400, 600])
    exact = np.argsort(-(queries @ x.T), axis=1, kind='stable')[:, :10]
    np.testing.assert_array_equal(offsets[shard_ids] + ids, exact)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ x.T, exact, 1), rtol=0, atol=1e-5)
    hnsw = load_index(build_index_from_units(units, tmp_path / 'hnsw', 'hnsw', shard_size=350, ef_search=64))
    assert [len(s) for s in hnsw.shards] == [300, 300, 100]
    _, shard_ids, ids = hnsw.search(queries, 10)
    assert _recall_at_10(np.array([0, 300, 600])[shard_ids] + ids, exact) > 0.9
    with pytest.raises(ValueError, match="on_disk=True needs index_type='ivf'"):
        build_index_from_units(units, tmp_path / 'bad', 'flat', on_disk=True)
    units.unit_path(6).unlink()
    with pytest.raises(ValueError, match='missing 1 of 7 units'):
        build_index_from_units(units, tmp_path / 'bad', 'flat')


def test_whitening_is_applied_when_indexing_and_recorded_in_the_index(tmp_path):
    from cgd_heads import Whitening
    x, labels = _clustered(n=600)
    units = _write_units(tmp_path / 'units', x, labels)
    whitening = Whitening.fit_pca(x[:300], dim=16)
    queries = x[::13]
    expected = RetrievalIndex.build(x, index_type='flat', whitening=whitening).search(queries, 10)
    flat = load_index(build_index_from_units(units, tmp_path / 'flat', 'flat', whitening=whitening, shard_size=300))
    scores, shard_ids, ids = flat.search(queries, 10)  # raw queries: every shard whitens them
    np.testing.assert_array_equal(np.array([0, 300])[shard_ids] + ids, expected[1])
    np.testing.assert_allclose(scores, expected[0], rtol=0, atol=1e-5)
    ivf = load_index(build_index_from_units(units, tmp_path / 'ivf', 'ivf', whitening=whitening, train_size=600,
                                            nlist=4, nprobe=4))
    assert (ivf.dim, ivf.input_dim) == (16, 32) and ivf.whitening is not None
    np.testing.assert_array_equal(ivf.search(queries, 10)[1], expected[1])  # IVF-Flat probing every list: exact
    # the units stay raw: the embeddings read back are the model's, not the whitened ones
    assert np.array_equal(load_units(tmp_path / 'units')[0].numpy(), x)
