"""The scripts in ``examples/``: each runs with its tiny defaults (synthetic data, a few steps) and prints what it
promises; each has ``--help``, a module docstring and a line in ``examples/README.md``.

The runs are subprocesses (``sys.executable``), as a user would start them; ``--help`` runs in-process (``runpy``)
so that it does not pay for importing torch once more per script.
"""
import ast
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / 'examples'
EXAMPLES = sorted(EXAMPLES_DIR.glob('0*.py'))
NAMES = [p.name for p in EXAMPLES]
TIMEOUT = 600  # seconds; each takes ~15-25 s on a shared 2-core machine


def run_example(name, *args, launcher=(), env=None):
    proc = subprocess.run([sys.executable, *launcher, str(EXAMPLES_DIR / name), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f'{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def floats_after(label, text):
    return [float(v) for v in re.findall(rf'^{re.escape(label)}\s*(\S+)$', text, flags=re.MULTILINE)]


def test_the_examples_are_there():
    assert NAMES == ['01_own_backbone.py', '02_train_and_evaluate.py', '03_index_and_search.py',
                     '04_export_onnx.py', '05_torchrun_training.py', '06_postprocess.py',
                     '07_distributed_extraction.py']


@pytest.mark.parametrize('name', NAMES)
def test_docstring_and_readme_entry(name):
    doc = ast.get_docstring(ast.parse((EXAMPLES_DIR / name).read_text(encoding='utf-8')))
    assert doc and len(doc.splitlines()) >= 3, f'{name} needs a module docstring saying what it shows'
    assert f'python examples/{name}' in doc or f'examples/{name}' in doc, f'{name}: the docstring says how to run it'
    readme = (EXAMPLES_DIR / 'README.md').read_text(encoding='utf-8')
    assert f'examples/{name}' in readme, f'{name} is not listed in examples/README.md'


@pytest.mark.parametrize('name', NAMES)
def test_help(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, 'argv', [name, '--help'])
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))  # as `python examples/NAME` puts it first
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(EXAMPLES_DIR / name), run_name='__main__')
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage:') and '--data' in out and '--out' in out


def test_synthetic_folder_is_a_folder_per_class_data_set(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    from _synthetic import write_synthetic_folder

    from cgd_heads.data import load_splits
    images = load_splits('folder', write_synthetic_folder(tmp_path / 'data', num_classes=7, per_class=3, size=20))
    assert images['all'].num_classes == 7 and len(images['all']) == 21
    with Image.open(images['all'].paths[0]) as img:
        assert img.size == (20, 20) and img.mode == 'RGB'


def test_01_own_backbone(tmp_path):
    out = run_example('01_own_backbone.py', '--out', tmp_path)
    assert 'no --data given' in out and '(96, 2, 2) -> (96, 4, 4) after strip_last_stride' in out
    losses = [float(v) for v in re.findall(r'^step \d+/5: loss (\S+) ', out, flags=re.MULTILINE)]
    assert len(losses) == 5 and all(math.isfinite(v) and v > 0 for v in losses), out
    assert (tmp_path / 'weights.pt').is_file()


def test_02_train_and_evaluate(tmp_path):
    out = run_example('02_train_and_evaluate.py', '--out', tmp_path)
    recalls = [floats_after(f'Recall@{k}:', out) for k in (1, 2, 4, 8)]
    map_r = floats_after('MAP@R:', out)
    assert all(len(r) == 1 for r in recalls) and len(map_r) == 1, out
    values = [r[0] for r in recalls] + map_r
    assert all(0 <= v <= 1 for v in values), out
    assert values[:4] == sorted(values[:4]), 'Recall@K cannot fall as K grows'
    assert (tmp_path / 'run' / 'best' / 'model.safetensors').is_file()
    assert len(re.findall(r'^epoch \d: loss', out, flags=re.MULTILINE)) == 2


def test_03_index_and_search(tmp_path):
    out = run_example('03_index_and_search.py', '--out', tmp_path)
    assert re.search(r'^index: 76 images, 64-d, flat', out, flags=re.MULTILINE), out
    assert len(re.findall(r'^query class_\d\d: ', out, flags=re.MULTILINE)) == 4
    assert re.search(r'^top-1 correct: [0-4]/4$', out, flags=re.MULTILINE), out
    assert (tmp_path / 'index' / 'index.json').is_file()
    grid = tmp_path / 'retrieval_grid.png'
    assert f'grid: {grid}' in out
    with Image.open(grid) as img:  # 4 rows of 96 px thumbnails + 6 px frames, 8 px gaps: 4 * 108 + 5 * 8
        assert img.format == 'PNG' and img.height == 472


def test_04_export_onnx(tmp_path):
    out = run_example('04_export_onnx.py', '--out', tmp_path)
    diff = floats_after('max abs difference:', out)
    assert len(diff) == 1 and 0 <= diff[0] < 1e-4, out
    assert 'onnxruntime: (8, 64) embeddings of 8 images, PyTorch: (8, 64)' in out
    assert (tmp_path / 'model.onnx').is_file()


def test_05_torchrun_training_single_process(tmp_path):
    out = run_example('05_torchrun_training.py', '--out', tmp_path)
    assert 'trained on 1 process(es)' in out and (tmp_path / 'run' / 'best' / 'model.safetensors').is_file()


@pytest.mark.slow  # starts two processes under torchrun
def test_05_torchrun_training_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = run_example('05_torchrun_training.py', '--out', tmp_path, env=env,
                      launcher=('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'))
    assert out.count('trained on 2 process(es)') == 1, out  # only rank 0 prints
    assert out.count('no --data given') == 1, out
    rows = re.findall(r'^epoch \d: loss (\S+), .* val Recall@1 (\S+)$', out, flags=re.MULTILINE)
    assert len(rows) == 2 and all(math.isfinite(float(loss)) and 0 <= float(r1) <= 1 for loss, r1 in rows), out
    assert (tmp_path / 'run' / 'best' / 'model.safetensors').is_file()
    assert (tmp_path / 'run' / 'last' / 'training_state.safetensors').is_file()


def test_06_postprocess(tmp_path):
    out = run_example('06_postprocess.py', '--out', tmp_path)
    assert 'embeddings: 48 training images (whitenings learn here), 32 test images, 64-d' in out, out
    assert 'learned whitening 64 -> 32 saved in' in out
    assert (tmp_path / 'whitening' / 'whitening.safetensors').is_file()
    rows = re.findall(r'^\| ([^|]+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) \|$', out, flags=re.MULTILINE)
    names = [name for name, *_ in rows][1:]  # the header row first
    assert names == ['none', 'PCA-whitening 32', 'learned whitening 32', 'alpha-QE n=2', 'DBA n=2',
                     're-ranking 4,2,0.3', 'learned whitening + QE + re-ranking'], out
    for name, *cells in rows[1:]:
        values = [float(v) for v in cells]
        assert all(0 <= v <= 100 for v in values) and values[:3] == sorted(values[:3]), (name, values)


def _units_example(tmp_path, launcher=(), env=None):
    out = run_example('07_distributed_extraction.py', '--out', tmp_path, launcher=launcher, env=env)
    assert '80 images in 5 units of 16' in out and 'each image exactly once: True' in out, out
    assert 'index: 80 vectors, ShardedIndex' in out and 'queries that find themselves first: 5/5' in out, out
    return out


def test_07_distributed_extraction_single_process(tmp_path):
    out = _units_example(tmp_path)
    assert 'embedded by 1 process(es)' in out
    assert len(list((tmp_path / 'units').glob('unit-*.safetensors'))) == 5


@pytest.mark.slow  # starts two processes under torchrun
def test_07_distributed_extraction_two_processes(tmp_path):
    out = _units_example(tmp_path, env=dict(os.environ, OMP_NUM_THREADS='1'),
                         launcher=('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2'))
    assert out.count('embedded by 2 process(es)') == 1, out  # only rank 0 prints
