"""``cgd-index --units`` / ``cgd-eval --units`` on real (generated PNG) images with a tiny test_efficientnet at 32 px:
in one process, under ``torchrun`` with two gloo processes (the same units as one process), after a rank killed
with SIGKILL in the middle of a unit (the rerun finishes, nothing lost or duplicated), and the options' one-line
errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from cgd_heads import EmbeddingUnits, ShardedIndex, create_model, load_index, load_units, save_pretrained
from cgd_heads.cli import eval_main, index_main, search_main
from cgd_heads.data import data_config_of, read_image_folder
from cgd_heads.retrieval.distributed_extract import KILL_ENV
from cgd_heads.retrieval.extract import load_embeddings
from conftest import write_shapes_folder

RUNTIME = ['--device', 'cpu', '--num-workers', '0', '--quiet', '--batch-size', '4']
#: one process and two embed the same units in batches of the same composition; threads (1 vs the default) may
#: still change float rounding: embeddings are compared within this absolute tolerance (unit vectors)
ATOL = 1e-5


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """48 PNG images of 8 classes and a test_efficientnet checkpoint (16-d embeddings, 32 px)."""
    root = tmp_path_factory.mktemp('cli_units')
    images = write_shapes_folder(root / 'shapes')
    torch.manual_seed(0)
    model = create_model('test_efficientnet', embed_dim=16).eval()
    checkpoint = save_pretrained(model, root / 'checkpoint', extra={'data': data_config_of(model, 32)})
    return images, checkpoint


def _writers(units: EmbeddingUnits):
    writers = []
    for unit in range(units.num_units):
        with safe_open(str(units.unit_path(unit)), framework='np') as f:
            writers.append(f.metadata()['writer'])
    return writers


def test_index_search_and_eval_through_units_in_one_process(setup, tmp_path, capsys):
    images, checkpoint = setup
    common = ['--checkpoint', str(checkpoint), '--images', str(images), '--units', str(tmp_path / 'units'), *RUNTIME]
    assert index_main([*common, '--unit-size', '10', '--out', str(tmp_path / 'ivf'), '--index-type', 'ivf',
                       '--nlist', '2', '--nprobe', '2', '--on-disk']) == 0
    assert 'indexed 48 images from 5 units' in capsys.readouterr().out
    ivf = load_index(tmp_path / 'ivf')
    assert ivf.paths == read_image_folder(images)['all'].paths and ivf.params['nlist'] == 2
    assert json.loads((tmp_path / 'ivf' / 'index.json').read_text())['format_version'] == 3
    assert _writers(EmbeddingUnits.open(tmp_path / 'units')) == ['rank 0 of 1'] * 5
    # the units alone (no images, no checkpoint): flat shards of at most 20 vectors, searched as one
    assert index_main(['--units', str(tmp_path / 'units'), '--out', str(tmp_path / 'flat'), '--shard-size', '20']) == 0
    assert '(flat, 3 shards)' in capsys.readouterr().out
    flat = load_index(tmp_path / 'flat')
    assert isinstance(flat, ShardedIndex) and [len(s) for s in flat.shards] == [20, 20, 8]
    # how the units were embedded travels into the index, so cgd-search embeds its queries the same way
    assert flat.shards[0].metadata['preprocessing'] == {'img_size': 32, 'flip': False, 'scales': [1.0]}
    query = images / 'class_05' / '2.png'
    assert search_main([str(query), '--index', str(tmp_path / 'flat'), '--checkpoint', str(checkpoint), '--k', '3',
                        '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['results']
    assert top[0]['path'] == str(query) and top[0]['label'] == 'class_05'
    # cgd-eval reads the split from units and reports what in-memory extraction reports
    data = ['--checkpoint', str(checkpoint), '--data', str(images), '--train-classes', '6', '--ks', '1,2', *RUNTIME]
    assert eval_main([*data, '--output', str(tmp_path / 'memory.json')]) == 0
    assert eval_main([*data, '--units', str(tmp_path / 'eval_units'), '--unit-size', '5', '--learn-whitening', 'pca',
                      '--output', str(tmp_path / 'units.json')]) == 0
    assert eval_main([*data, '--units', str(tmp_path / 'eval_units'), '--output', str(tmp_path / 'again.json')]) == 0
    memory, units, again = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('memory', 'units', 'again'))
    assert {k: again[k] for k in ('recall@1', 'recall@2', 'map@r')} == \
        pytest.approx({k: memory[k] for k in ('recall@1', 'recall@2', 'map@r')}, abs=1e-6)
    assert units['postprocess']['whitening'] == 'pca'
    # embeddings saved from units record their flip and scales as in-memory extraction does
    assert eval_main([*data, '--units', str(tmp_path / 'flip_units'), '--flip', '--scales', '1,0.75',
                      '--save-embeddings', str(tmp_path / 'flip.safetensors')]) == 0
    assert load_embeddings(tmp_path / 'flip.safetensors')[3]['preprocessing'] == \
        {'img_size': 32, 'flip': True, 'scales': [1.0, 0.75]}
    assert EmbeddingUnits.open(tmp_path / 'eval_units' / 'test').num_units == 3  # 12 test images, units of 5
    assert EmbeddingUnits.open(tmp_path / 'eval_units' / 'train').count == 36


@pytest.mark.parametrize('extra, message', [
    (['--unit-size', '0', '--units', 'U'], '--unit-size must be a positive int'),
    (['--unit-size', '5'], '--unit-size needs --units DIR'),
    (['--on-disk', '--units', 'U'], '--on-disk needs --index-type ivf'),
    (['--train-size', '100'], '--train-size, --on-disk and --shard-size need --units DIR'),
    (['--nlist', '4'], '--nlist applies to --index-type ivf, not flat'),
    (['--index-type', 'ivf', '--pq-m', '0'], '--pq-m must be a positive int'),
    (['--units', 'OTHER'], 'holds units written for another model'),
    (['--units', 'U', '--whiten', 'WHITE'], 'was learned for another model'),
])
def test_units_options_fail_in_one_line(extra, message, setup, tmp_path, capsys):
    from cgd_heads import Whitening
    images, checkpoint = setup
    if 'OTHER' in extra:
        EmbeddingUnits.create(tmp_path / 'other', 48, 10, 'weights-sha256:another', 'sha256:list')
    if 'WHITE' in extra:
        Whitening.fit_pca(np.eye(16, dtype=np.float32), dim=4).save(tmp_path / 'white', fingerprint='sha256:other')
    names = {'OTHER': tmp_path / 'other', 'U': tmp_path / 'u', 'WHITE': tmp_path / 'white'}
    extra = [str(names.get(a, a)) for a in extra]
    assert index_main(['--checkpoint', str(checkpoint), '--images', str(images), '--out', str(tmp_path / 'i'),
                       *RUNTIME, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith('cgd-index: error: ') and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'u').exists()  # refused before any extraction


def test_torchrun_without_units_is_refused(setup, tmp_path, capsys, monkeypatch):
    images, checkpoint = setup
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert eval_main(['--checkpoint', str(checkpoint), '--data', str(images), '--train-classes', '6', *RUNTIME]) == 2
    assert 'under torchrun pass --units DIR' in capsys.readouterr().err


def _torchrun(nproc: int, script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    path = Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f'{path} not installed (pip install -e .)')
    base = {key: value for key, value in os.environ.items() if key != KILL_ENV}
    env = dict(base, OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           f'--nproc_per_node={nproc}', str(path), *args, *RUNTIME],
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # two processes under torchrun
def test_torchrun_two_processes_write_the_units_of_one_process(setup, tmp_path):
    images, checkpoint = setup
    args = ['--checkpoint', str(checkpoint), '--images', str(images), '--unit-size', '4', '--index-type', 'flat']
    proc = _torchrun(2, 'cgd-index', *args, '--units', str(tmp_path / 'two'), '--out', str(tmp_path / 'index'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('indexed 48 images from 12 units') == 1  # rank 0 alone builds and reports
    assert index_main([*args, '--units', str(tmp_path / 'one'), '--out', str(tmp_path / 'one_index'), *RUNTIME]) == 0
    two, one = EmbeddingUnits.open(tmp_path / 'two'), EmbeddingUnits.open(tmp_path / 'one')
    assert two.manifest == one.manifest  # same model, list, preprocessing and units, whatever the processes
    assert _writers(two) == [f'rank {u % 2} of 2' for u in range(12)]  # unit u -> rank u % 2: each image once
    ids = np.concatenate([u.ids for u in two])
    assert ids.tolist() == list(range(48))
    (e2, l2, p2, _), (e1, l1, p1, _) = load_units(tmp_path / 'two'), load_units(tmp_path / 'one')
    torch.testing.assert_close(e2, e1, rtol=0, atol=ATOL)
    assert l2.tolist() == l1.tolist() and p2 == p1 == read_image_folder(images)['all'].paths
    assert len(load_index(tmp_path / 'index')) == 48


@pytest.mark.slow  # two processes under torchrun, one of them killed
def test_a_rank_killed_mid_unit_leaves_finished_units_and_the_rerun_completes(setup, tmp_path):
    images, checkpoint = setup
    args = ['--checkpoint', str(checkpoint), '--images', str(images), '--units', str(tmp_path / 'units'),
            '--out', str(tmp_path / 'index')]
    # rank 1 writes one unit (unit 1), embeds its next one (unit 3) and kills itself before writing it
    proc = _torchrun(2, 'cgd-index', *args, '--unit-size', '4', env={KILL_ENV: '1:1'})
    assert proc.returncode != 0 and 'SIGKILL' in proc.stderr, proc.stderr[-3000:]
    units = EmbeddingUnits.open(tmp_path / 'units')
    missing = units.missing_units()
    assert 3 in missing and 1 not in missing and not (tmp_path / 'index' / 'shards.json').exists()
    finished = {u: os.stat(units.unit_path(u)).st_ino for u in range(12) if u not in missing}
    # the rerun, here with one process, embeds the missing units only
    assert index_main([*args, *RUNTIME]) == 0
    assert units.missing_units() == []
    assert all(os.stat(units.unit_path(u)).st_ino == inode for u, inode in finished.items())
    ids = np.concatenate([u.ids for u in units])
    assert ids.tolist() == list(range(48))  # nothing lost, nothing twice
    assert len(load_index(tmp_path / 'index')) == 48


@pytest.mark.slow  # two processes under torchrun
def test_torchrun_eval_through_units_reports_once(setup, tmp_path):
    images, checkpoint = setup
    data = ['--checkpoint', str(checkpoint), '--data', str(images), '--train-classes', '6', '--ks', '1,2']
    proc = _torchrun(2, 'cgd-eval', *data, '--units', str(tmp_path / 'units'), '--unit-size', '3',
                     '--output', str(tmp_path / 'two.json'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('recall@1') == 1
    assert eval_main([*data, *RUNTIME, '--output', str(tmp_path / 'one.json')]) == 0
    two, one = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('two', 'one'))
    assert {k: two[k] for k in ('recall@1', 'recall@2', 'map@r')} == \
        pytest.approx({k: one[k] for k in ('recall@1', 'recall@2', 'map@r')}, abs=1e-6)
    assert _writers(EmbeddingUnits.open(tmp_path / 'units' / 'test')) == ['rank 0 of 2', 'rank 1 of 2'] * 2


def test_index_no_labels_indexes_a_catalogue_in_memory_and_through_units(setup, tmp_path, capsys):
    import shutil
    images, checkpoint = setup
    labelled = read_image_folder(images)['all']
    # a catalogue: 5 images directly in the folder, the rest in storage sub-folders nested two deep
    catalogue = tmp_path / 'catalogue'
    (catalogue / 'batch_a' / 'deep').mkdir(parents=True)
    copies = {}
    for i, src in enumerate(labelled.paths[:12]):
        dst = catalogue / ('' if i < 5 else 'batch_a/deep' if i % 2 else 'batch_a') / f'item_{i:02d}.png'
        shutil.copy(src, dst)
        copies[str(dst.resolve())] = src
    (catalogue / '.hidden.png').write_bytes(b'not read')  # hidden files are not part of the catalogue
    # a folder without class sub-folders is refused with the way out, not indexed as nothing
    capsys.readouterr()
    assert index_main(['--checkpoint', str(checkpoint), '--images', str(catalogue / 'batch_a' / 'deep'), *RUNTIME,
                       '--out', str(tmp_path / 'refused')]) == 2
    err = capsys.readouterr().err.strip()
    assert 'has no class sub-folders: pass --no-labels' in err and len(err.splitlines()) == 1
    assert index_main(['--checkpoint', str(checkpoint), '--data', str(images), *RUNTIME, '--no-labels',
                       '--out', str(tmp_path / 'refused')]) == 2
    assert '--no-labels: only with --images FOLDER' in capsys.readouterr().err

    common = ['--checkpoint', str(checkpoint), '--images', str(catalogue), *RUNTIME]
    assert index_main([*common, '--no-labels', '--out', str(tmp_path / 'memory')]) == 0
    assert index_main([*common, '--no-labels', '--units', str(tmp_path / 'units'), '--unit-size', '5',
                       '--out', str(tmp_path / 'streamed')]) == 0
    # the units alone, read back into an ivf index with its lists on disk: still no labels, no class names
    assert index_main(['--units', str(tmp_path / 'units'), '--index-type', 'ivf', '--nlist', '2', '--on-disk',
                       '--out', str(tmp_path / 'ivf')]) == 0
    ivf = load_index(tmp_path / 'ivf')
    assert ivf.labels == [None] * 12 and sorted(ivf.paths) == sorted(copies) and 'class_names' not in ivf.metadata
    assert index_main(['--checkpoint', str(checkpoint), '--images', str(images), *RUNTIME,
                       '--out', str(tmp_path / 'labelled')]) == 0
    by_path = load_index(tmp_path / 'labelled')
    query = images / 'class_00' / '0.png'
    for name in ('memory', 'streamed'):
        index = load_index(tmp_path / name)
        if isinstance(index, ShardedIndex):  # the units path writes flat indexes as shards (here one)
            (index,) = index.shards
        assert sorted(index.paths) == sorted(copies) and index.labels == [None] * 12
        assert 'class_names' not in index.metadata
        # every copy has the vector of its original in the labelled index
        ours = dict(zip(index.paths, index.faiss_index.reconstruct_n(0, len(index))))
        theirs = dict(zip(by_path.paths, by_path.faiss_index.reconstruct_n(0, len(by_path))))
        for path, vector in ours.items():
            np.testing.assert_allclose(vector, theirs[copies[path]], atol=ATOL)
        capsys.readouterr()
        assert search_main([str(query), '--index', str(tmp_path / name), '--k', '2', '--json']) == 0
        top = json.loads(capsys.readouterr().out)[0]['results']
        assert copies[top[0]['path']] == str(query) and top[0]['label'] is None
    assert search_main([str(query), '--index', str(tmp_path / 'memory'), '--k', '2']) == 0
    lines = capsys.readouterr().out.splitlines()  # the text output shows '-' where a label would be
    assert len(lines) == 3 and all(line.split()[2] == '-' for line in lines[1:]), lines
    # the same images with labels into units made without them: refused, naming why, not mixed
    shapes = ['--checkpoint', str(checkpoint), '--images', str(images), *RUNTIME, '--units', str(tmp_path / 'u2')]
    assert index_main([*shapes, '--no-labels', '--out', str(tmp_path / 'i2')]) == 0
    capsys.readouterr()
    assert index_main([*shapes, '--out', str(tmp_path / 'i3')]) == 2
    assert 'another image list (other paths, or other labels: e.g. labelled vs unlabelled)' in capsys.readouterr().err
