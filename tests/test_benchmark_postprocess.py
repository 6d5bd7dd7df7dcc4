"""benchmarks/postprocess.py runs end to end in its smoke configurations: both parts write their tables."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, write_shapes_folder
from cgd_heads.data import load_splits
from cgd_heads.training import TrainConfig, train

pytestmark = pytest.mark.slow

SCRIPT = REPO / 'benchmarks' / 'postprocess.py'
QUALITY_ROWS = [
    'none', 'PCA (no whitening) d=16', 'PCA-whitening d=16', 'learned whitening d=16', 'alpha-QE', 'DBA (transductive)',
    'k-reciprocal re-ranking (transductive)', 'best whitening + alpha-QE', 'best whitening + DBA (transductive)',
    'best whitening + re-ranking (transductive)',
    'all: best whitening + DBA + alpha-QE + re-ranking (transductive)',
    'control: best whitening learned on the held-out classes',
    'control: best whitening learned on all training classes',
]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def table(text: str):
    """The rows of the markdown table as lists of cells (header and separator dropped)."""
    lines = [line for line in text.splitlines() if line.startswith('| ')]
    return [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[1:] if '---' not in line]


def test_cost_quick(tmp_path):
    out = tmp_path / 'cost.md'
    # 800 items: dense re-ranking (~0.06 GB estimated) is over the 0.05 GB budget and skipped; at 200 it runs
    run('--part', 'cost', '--quick', '--dense-max-gb', '0.05', '--output', str(out))
    text = out.read_text()
    assert 'SMOKE RUN' in text and 'Command: `python benchmarks/postprocess.py --part cost --quick' in text
    rows = table(text)
    measured = {(r[0], r[1]) for r in rows if r[2] != '-'}
    for step in ('PCA-whitening fit + apply', 'learned whitening fit + apply', 'alpha-QE query-vs-rest', 'DBA',
                 'k-reciprocal re-ranking, sparse, query-vs-rest'):
        assert ('800', step) in measured, rows
    assert ('200', 'k-reciprocal re-ranking, dense, query-vs-rest') in measured
    assert ('200', 'k-reciprocal re-ranking, sparse, query-vs-rest') in measured
    skipped = [r for r in rows if r[0] == '800' and r[1].startswith('k-reciprocal re-ranking, dense')]
    assert len(skipped) == 1 and skipped[0][2] == '-' and 'skipped' in skipped[0][-1] and '--dense-max-gb' in \
        skipped[0][-1]
    for r in rows:
        if r[2] != '-':
            float(r[2]), float(r[4]), float(r[5])  # seconds, peak above data, data MB
    payload = json.loads(out.with_suffix('.json').read_text())
    assert payload['part'] == 'cost' and len(payload['rows']) == len(rows) and 'error' not in str(payload['rows'])


def test_cost_quick_refuses_the_committed_results_file():
    proc = subprocess.run([sys.executable, str(SCRIPT), '--part', 'cost', '--quick'], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and 'pass an --output other than the committed results file' in proc.stderr


def test_quality_quick_on_a_tiny_checkpoint(tmp_path):
    data = write_shapes_folder(tmp_path / 'shapes', num_classes=12, per_class=6)
    config = TrainConfig(model_name='test_resnet', embed_dim=16, img_size=24, resize_size=28, batch_size=8,
                         m_per_class=2, epochs=1, lr=1e-3, num_workers=0, progress=False, val_classes=0, seed=0)
    train(config, load_splits('folder', data, train_classes=8)['train'], tmp_path / 'run')
    out = tmp_path / 'quality.md'
    args = ('--part', 'quality', '--quick', '--dataset', 'folder', '--data', str(data), '--train-classes', '8',
            '--checkpoint', str(tmp_path / 'run' / 'best'), '--num-workers', '0', '--output', str(out))
    first = run(*args)
    assert 'embedded 48 images' in first.stdout and 'embedded 24 images' in first.stdout
    text = out.read_text()
    assert 'DBA and k-reciprocal re-ranking use the test gallery itself' in text and 'NMI of the raw test' in text
    assert '2 of the 8 TRAINING classes' in text and '24 images of 4 classes' in text
    rows = table(text)
    assert [r[0] for r in rows] == QUALITY_ROWS
    for r in rows:
        for cell in r[4:8]:  # test R@1, test MAP@R, deltas
            assert 0 <= abs(float(cell)) <= 100
    assert [r[6:8] for r in rows if r[0] == 'none'] == [['+0.00', '+0.00']]
    assert all(r[2] == '-' for r in rows if r[0].startswith('control'))
    payload = json.loads(out.with_suffix('.json').read_text())
    assert [r['row'] for r in payload['rows']] == QUALITY_ROWS and 0 <= payload['nmi_raw_test'] <= 1
    second = run(*args)  # the embeddings come from the cache, and the numbers do not change
    assert 'from the cache' in second.stdout and 'embedded' not in second.stdout
    assert table(out.read_text()) == rows


def test_validation_classes_default_to_the_checkpoint_runs_own(tmp_path, monkeypatch):
    import argparse
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import postprocess

    (tmp_path / 'run' / 'best').mkdir(parents=True)
    (tmp_path / 'run' / 'train_config.json').write_text(json.dumps({'val_classes': 14, 'seed': 3}))

    def resolved(checkpoint, val_classes=None, seed=None):
        args = argparse.Namespace(checkpoint=str(checkpoint), val_classes=val_classes, seed=seed)
        postprocess.validation_classes(args)
        return args.val_classes, args.seed, args.val_source

    assert resolved(tmp_path / 'run' / 'best')[:2] == (14, 3)  # training's validation classes: never trained on
    assert resolved(tmp_path / 'run' / 'best', val_classes=0.3)[:2] == (0.3, 0)
    assert 'as given' in resolved(tmp_path / 'run' / 'best', val_classes=0.3)[2]
    assert resolved(tmp_path / 'elsewhere' / 'best')[:2] == (0.2, 0)
    assert 'may include classes it trained on' in resolved(tmp_path / 'elsewhere' / 'best')[2]


@pytest.mark.parametrize('n', [2, 6, 9])
def test_the_cost_steps_run_on_galleries_smaller_than_eight(n, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import postprocess

    x, labels = postprocess.synthetic_embeddings(n, 8)
    parts = postprocess.run_step('rerank-sparse', x, labels)  # asked for 8 neighbours of 5 before
    assert set(parts) == {'rerank'} and parts['rerank'] >= 0


def test_every_cost_step_runs_at_the_smallest_size_the_option_takes(monkeypatch):
    import argparse
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import postprocess

    with pytest.raises(argparse.ArgumentTypeError, match='>= 10'):
        postprocess.sizes('9')  # 2 and 3 drew a single class: learned whitening failed
    n = postprocess.sizes('10')[0]
    x, labels = postprocess.synthetic_embeddings(n, 8)
    for step in postprocess.STEPS:
        assert all(seconds >= 0 for seconds in postprocess.run_step(step, x, labels).values()), step
