"""cgd-demo end to end in a tiny configuration: the printed table, the cosine spread and the sample query are what
the trained checkpoint and the saved index really give."""
import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cgd_heads import CGDModel, RetrievalIndex
from cgd_heads.cli import demo
from cgd_heads.cli.common import eval_transform
from cgd_heads.data import ImageDataset, data_config_of, load_splits
from cgd_heads.retrieval.extract import extract_embeddings
from cgd_heads.retrieval.whitening import model_fingerprint

pytest.importorskip('sklearn')  # the embedded digits come from scikit-learn (extra 'demo')

TINY = ['--epochs', '1', '--model', 'test_resnet', '--embed-dim', '16', '--quiet', '--device', 'cpu']
TRAINED = 'CGD SG, trained 1 epochs'
ROWS = ['untrained (random init)', TRAINED, f'{TRAINED}, centred']


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """One tiny demo run (a few seconds): its output folder, returned rows and printed text."""
    out = tmp_path_factory.mktemp('demo') / 'out'
    # what a demo killed between the two renames of a checkpoint swap leaves: a rerun starts afresh
    (out / 'run' / '.last.previous').mkdir(parents=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rows = demo.run(demo._parser().parse_args([*TINY, '--out', str(out)]))
    return out, rows, printed.getvalue()


@pytest.fixture(scope='module')
def test_embeddings(demo_run):
    """Embeddings and labels of the unseen digits (6-9) by the saved best checkpoint, and the saved index."""
    out = demo_run[0]
    model = CGDModel.from_pretrained(out / 'run' / 'best')
    test = load_splits('folder', out / 'digits', train_classes=demo.DIGITS_TRAIN_CLASSES)['test']
    emb, labels = extract_embeddings(model, ImageDataset(test, eval_transform(data_config_of(model, 32))),
                                     batch_size=256, device='cpu', progress=False)
    return model, test, emb, labels, RetrievalIndex.load(out / 'index')


def _table_rows(printed):
    """``{row name: [R@1, R@2, R@4, R@8, MAP@R]}`` of the printed Markdown table."""
    lines = printed.splitlines()
    header = lines.index('| model | R@1 | R@2 | R@4 | R@8 | MAP@R |')
    assert lines[header + 1] == '|---|---|---|---|---|---|'
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith('| '):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_table_has_the_three_rows_with_consistent_metrics(demo_run, test_embeddings):
    _, rows, printed = demo_run
    table = _table_rows(printed)
    assert list(table) == ROWS and list(rows) == ROWS
    for name, values in table.items():
        assert len(values) == 5 and all(0 <= v <= 100 for v in values), (name, values)
        assert values[:4] == sorted(values[:4]), f'Recall@K must not decrease with K: {name} {values}'
        assert values[0] == pytest.approx(100 * rows[name]['recall@1'], abs=0.051)  # printed with 1 decimal
        assert values[4] == pytest.approx(100 * rows[name]['map@r'], abs=0.051)
    unseen = len(test_embeddings[1])
    assert f'Zero-shot retrieval on {unseen} query images of unseen classes (test_resnet, 32 px, 16-d' in printed


def test_printed_cosine_spread_is_that_of_the_checkpoint_and_the_index(demo_run, test_embeddings):
    """The same / other-class cosines printed for the trained rows are those of the saved checkpoint's embeddings,
    raw and through the index's centring."""
    _, rows, printed = demo_run
    model, _, emb, labels, index = test_embeddings
    raw = demo.cosine_spread(emb, labels)
    centred = demo.cosine_spread(index.whitening.apply(emb.numpy()), labels)
    assert (rows[TRAINED]['cos same'], rows[TRAINED]['cos other']) == pytest.approx(raw, abs=1e-4)
    assert (rows[ROWS[2]]['cos same'], rows[ROWS[2]]['cos other']) == pytest.approx(centred, abs=1e-4)
    for name in ROWS:
        same, other = rows[name]['cos same'], rows[name]['cos other']
        assert re.search(rf'^  {re.escape(name)}: -?\d\.\d+ / -?\d\.\d+$', printed, re.M), name
        assert -1 <= other <= 1 and -1 <= same <= 1


def test_centred_embeddings_of_the_trained_checkpoint_are_not_collapsed(test_embeddings):
    """Through the centring the index applies, images of one unseen digit are clearly closer to each other than
    to other digits, and the scores spread instead of all sitting near 1."""
    model, _, emb, labels, index = test_embeddings
    assert index.whitening is not None and index.whitening.fingerprint == model_fingerprint(model.config)
    centred = index.whitening.apply(emb.numpy())
    same, other = demo.cosine_spread(centred, labels)
    assert other < 0.2, f'centred embeddings still collapsed: other-class cosine {other:.3f}'
    assert same - other > 0.02, f'same-class {same:.3f} vs other-class {other:.3f}'
    sims = centred @ centred.T
    off_diagonal = sims[~np.eye(len(sims), dtype=bool)]
    assert off_diagonal.std() > 0.05 and off_diagonal.min() < 0


def test_index_holds_the_centred_unseen_images_and_applies_the_centring_to_queries(test_embeddings):
    _, test, emb, labels, index = test_embeddings
    assert len(index) == len(test) and index.paths == list(test.paths) and index.labels == labels.tolist()
    scores, ids = index.search(emb[:20], k=1)  # raw embeddings in, centred by the index: each finds itself
    assert ids[:, 0].tolist() == list(range(20)) and np.allclose(scores[:, 0], 1, atol=1e-4)


def test_sample_query_lists_five_distinct_scores_best_first_with_class_marks(demo_run, test_embeddings):
    _, _, printed = demo_run
    _, _, emb, labels, index = test_embeddings
    match = re.search(r'^Query (\S+) \(class (\d)\): top 5 of (\d+)\n\(score: cosine of centred embeddings; '
                      r'\+ same class, - other class\)\n((?:  [+-] +-?\d\.\d{4}  class \d  \S+\n){5})', printed, re.M)
    assert match, printed
    query_path, query_class = match.group(1), match.group(2)
    assert int(match.group(3)) == len(emb) - 1
    answers = [line.split() for line in match.group(4).splitlines()]
    scores = [float(a[1]) for a in answers]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1, f'all printed scores are identical: {scores}'
    assert all(-1 <= s <= 1 for s in scores) and scores[0] < 0.9999
    for mark, _, _, label, path in answers:
        assert mark == ('+' if label == query_class else '-') and path != query_path
    # the printed answers are what the saved index returns for that query
    query = index.paths.index(query_path)
    hits = [h for h in index.search_hits(emb[query:query + 1], k=6)[0] if h.id != query][:5]
    assert [h.path for h in hits] == [a[4] for a in answers]
    assert [round(h.score, 4) for h in hits] == pytest.approx(scores, abs=1e-4)


def test_cosine_spread_of_known_vectors():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # rows normalised inside
    same, other = demo.cosine_spread(x, [0, 0, 1, 1])
    assert same == pytest.approx(1.0) and other == pytest.approx(0.0)
    same, other = demo.cosine_spread(np.array([[1.0, 0.0], [0.6, 0.8]]), [0, 1])
    assert math.isnan(same) and other == pytest.approx(0.6)


def test_cosines_are_printed_with_the_decimals_that_tell_them_from_one():
    assert demo._fmt_cosines(0.99992, 0.9999) == '0.99992 / 0.99990'
    assert demo._fmt_cosines(0.0849, 0.016) == '0.085 / 0.016'
    assert demo._fmt_cosines(float('nan'), -0.25) == 'n/a / -0.250'


#: what the README allows between its demo table and a rerun on another machine (points, every cell)
README_TOLERANCE = 4.0  # 3 was exceeded by 3.2 (R@2) on a Xeon of this project, 2026-12-01


@pytest.mark.slow  # the README's own command with its defaults: about a minute of training
def test_readme_demo_table_matches_a_rerun_of_the_default_demo(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / 'README.md').read_text(encoding='utf-8')
    block = readme[readme.index('It printed on this project'):]
    stated = _table_rows(block[block.index('```text\n') + 8:block.index('```', block.index('```text\n') + 8)])
    assert f'{README_TOLERANCE:.0f} points on every number' in readme.replace('\n', ' ')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo.run(demo._parser().parse_args(['--quiet', '--out', str(tmp_path / 'demo')]))
    measured = _table_rows(printed.getvalue())
    assert list(measured) == list(stated), (list(measured), list(stated))
    for name, values in stated.items():
        assert measured[name] == pytest.approx(values, abs=README_TOLERANCE), (name, measured[name], values)
    # the README's promise: training plainly beats the untrained network on the unseen classes
    trained = [name for name in stated if name.startswith('CGD')][0]
    assert measured[trained][0] > measured['untrained (random init)'][0] + 10


@pytest.mark.parametrize('extra, flags', [(['--train-classes', '3'], '--train-classes'),
                                          (['--dataset', 'folder', '--train-classes', '0.5'],
                                           '--dataset, --train-classes')])
def test_data_options_without_data_are_refused_before_any_work(extra, flags, tmp_path, capsys):
    from cgd_heads.cli import demo_main
    out = tmp_path / 'demo'
    assert demo_main([*TINY, '--out', str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f'cgd-demo: error: {flags}: only with --data ROOT (the embedded digits are split 6 train / 4 '
                   f'test classes)')
    assert not out.exists()  # nothing written: the digits would have been split 6 / 4 whatever was asked
