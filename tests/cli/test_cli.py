"""The command-line pipeline end to end on a tiny generated data set, and its one-line errors."""
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from cgd_heads.cli import eval_main, index_main, search_main, train_main

TRAIN = ['--model', 'test_resnet', '--embed-dim', '16', '--img-size', '24', '--batch-size', '8',
         '--m-per-class', '2', '--epochs', '2', '--lr', '1e-3', '--num-workers', '0', '--quiet']


def test_train_eval_index_search(shapes_folder, tmp_path, capsys, caplog):
    run = tmp_path / 'run'
    with caplog.at_level(logging.INFO, logger='cgd_heads.training.trainer'):
        assert train_main(['--data', str(shapes_folder), '--train-classes', '6', '--val-classes', '2',
                           '--out', str(run), '--head-lr', '5e-3', *TRAIN]) == 0
    out = capsys.readouterr().out
    # it says what the learning rate will do: 4 training classes x 6 images / batch 8 = 3 updates per epoch
    assert 'learning rate: 2 epochs x 3 updates = 6 updates; lr 0.001, head_lr 0.005; x0.1 after update 4 ' \
           '(epoch 1.33), update 5 (epoch 1.67) (--sched step)' in caplog.text
    assert json.loads((run / 'train_config.json').read_text())['head_lr'] == 5e-3
    assert 'recipe' not in json.loads((run / 'best' / 'config.json').read_text())  # recorded only when given
    first_epoch = json.loads((run / 'metrics.jsonl').read_text().splitlines()[0])
    assert (first_epoch['lr'], first_epoch['head_lr']) == (1e-3, 5e-3)
    assert 'best checkpoint' in out and 'recall@1' in out
    test_metrics = json.loads((run / 'test_metrics.json').read_text())
    assert test_metrics['num_queries'] == 2 * 6  # the last 2 of the 8 classes are the test split

    assert eval_main(['--checkpoint', str(run / 'best'), '--data', str(shapes_folder), '--train-classes', '6',
                      '--ks', '1,2', '--flip', '--scales', '1,0.75', '--output', str(tmp_path / 'm.json'),
                      '--save-embeddings', str(tmp_path / 'emb.safetensors'), '--num-workers', '0', '--quiet']) == 0
    metrics = json.loads((tmp_path / 'm.json').read_text())
    assert set(metrics) >= {'recall@1', 'recall@2', 'map@r'} and metrics['flip'] is True
    from cgd_heads import evaluate_retrieval
    from cgd_heads.retrieval.extract import load_embeddings
    saved, saved_labels, _, _ = load_embeddings(tmp_path / 'emb.safetensors')
    reference = evaluate_retrieval(saved, saved_labels, ks=(1, 2))  # the printed numbers are the saved embeddings'
    assert {k: metrics[k] for k in ('recall@1', 'recall@2', 'map@r')} == pytest.approx(
        {k: reference[k] for k in ('recall@1', 'recall@2', 'map@r')})
    assert index_main(['--embeddings', str(tmp_path / 'emb.safetensors'), '--checkpoint', str(run / 'best'),
                       '--out', str(tmp_path / 'emb_index')]) == 0
    from cgd_heads import RetrievalIndex
    from cgd_heads.retrieval.extract import load_embeddings
    emb_index = RetrievalIndex.load(tmp_path / 'emb_index')
    emb, labels, paths, meta = load_embeddings(tmp_path / 'emb.safetensors')
    assert len(emb_index) == len(paths) == 12 and emb_index.labels == labels.tolist()
    assert meta['model'] == emb_index.metadata['model'] and 'checkpoint' in emb_index.metadata
    assert meta['preprocessing'] == emb_index.metadata['preprocessing'] == {'img_size': 24, 'flip': True,
                                                                             'scales': [1.0, 0.75]}
    capsys.readouterr()
    test_image = shapes_folder / 'class_07' / '0.png'
    assert search_main([str(test_image), '--index', str(tmp_path / 'emb_index'), '--k', '1', '--json']) == 0
    hit = json.loads(capsys.readouterr().out)[0]['results'][0]
    # the query is embedded as the indexed images were (flip, scales 1 and 0.75): it finds itself at cosine 1
    assert hit['path'] == str(test_image) and hit['score'] == pytest.approx(1.0, abs=1e-4)

    index_dir = tmp_path / 'index'
    assert index_main(['--checkpoint', str(run / 'best'), '--images', str(shapes_folder), '--out', str(index_dir),
                       '--num-workers', '0', '--quiet']) == 0
    capsys.readouterr()
    query = shapes_folder / 'class_07' / '0.png'
    assert search_main([str(query), '--index', str(index_dir), '--k', '3', '--json',
                        '--grid', str(tmp_path / 'grid.png')]) == 0
    results = json.loads(capsys.readouterr().out.split('grid:')[0])
    top = results[0]['results']
    assert len(top) == 3 and top[0]['path'] == str(query) and top[0]['score'] == pytest.approx(1.0, abs=1e-3)
    assert top[0]['label'] == 'class_07'
    assert (tmp_path / 'grid.png').stat().st_size > 0


def test_resume_flag_continues_a_run(shapes_folder, tmp_path, monkeypatch, capsys):
    import cgd_heads.training.trainer as train_module
    args = ['--data', str(shapes_folder), '--train-classes', '6', '--val-classes', '0', '--out',
            str(tmp_path / 'run'), '--no-test', *TRAIN]
    real_append = train_module._append_jsonl

    def interrupt_after_first_epoch(path, rows):
        real_append(path, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, '_append_jsonl', interrupt_after_first_epoch)
    assert train_main(args) == 130
    monkeypatch.setattr(train_module, '_append_jsonl', real_append)
    capsys.readouterr()
    assert train_main(args) == 2  # the run exists: refused without --resume
    assert 'already holds a training run' in capsys.readouterr().err
    assert train_main([*args, '--resume']) == 0
    rows = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(r)['epoch'] for r in rows] == [1, 2]


@pytest.mark.parametrize('case, extra, message', [
    ('missing', ['--train-classes', '6'], 'nowhere does not exist'),
    ('empty', ['--train-classes', '6'], 'cannot detect a data set layout'),
    ('no_eval_classes', ['--train-classes', '8'], 'train_classes must leave at least one class on each side'),
    ('too_few_images', ['--train-classes', '6', '--m-per-class', '8', '--batch-size', '16', '--val-classes', '0'],
     'have fewer than m_per_class=8 images'),
    ('out_not_dir', ['--train-classes', '6'], 'file is not a writable folder'),
    # an option the resolved reader does not take: named as the flag, not as the reader's keyword argument
    ('reader_option', ['--dataset', 'omniglot', '--train-classes', '6'], '--train-classes does not apply'),
    ('reader_option', ['--crop', '--train-classes', '6'], '--crop does not apply'),
    ('bad_resize', ['--train-classes', '6', '--resize-size', '20'], 'resize_size must be >= img_size (24)'),
])
def test_user_errors_are_one_line(case, extra, message, shapes_folder, tmp_path, capsys):
    data, out = shapes_folder, tmp_path / 'run'
    if case == 'missing':
        data = tmp_path / 'nowhere'
    elif case == 'empty':
        data = tmp_path / 'empty'
        data.mkdir()
    elif case == 'out_not_dir':
        (tmp_path / 'file').write_text('x')
        out = tmp_path / 'file' / 'run'
    assert train_main([*TRAIN, '--data', str(data), '--out', str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the check meant for the case, not any error that run_cli would also have printed in one line
    assert len(err) == 1 and err[0].startswith('cgd-train: error: ') and message in err[0], err


def test_console_script_exit_code_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, '-c', 'import sys; from cgd_heads.cli import eval_main; '
                           'sys.exit(eval_main())', '--checkpoint', str(tmp_path), '--data', str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert 'Traceback' not in proc.stderr and 'cgd-eval: error:' in proc.stderr


def test_demo_runs_end_to_end_in_a_tiny_configuration(tmp_path, capsys):
    from cgd_heads import RetrievalIndex
    from cgd_heads.cli import demo_main
    out = tmp_path / 'demo'
    args = ['--epochs', '1', '--model', 'test_resnet', '--embed-dim', '16', '--quiet', '--out', str(out)]
    assert demo_main(args) == 0
    printed = capsys.readouterr().out
    assert '| untrained (random init) |' in printed and '| CGD SG, trained 1 epochs |' in printed
    unseen = sum(len(list((out / 'digits' / str(d)).glob('*.png'))) for d in range(6, 10))
    assert f'Zero-shot retrieval on {unseen} query images' in printed
    index = RetrievalIndex.load(out / 'index')
    assert len(index) == unseen and (out / 'retrieval_grid.png').is_file() and (out / 'run' / 'best').is_dir()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 1-epoch checkpoint on the shapes data (6 train classes, 2 test classes of 6 images), made once."""
    from conftest import write_shapes_folder
    root = tmp_path_factory.mktemp('postprocess')
    data = write_shapes_folder(root / 'shapes')
    args = ['--data', str(data), '--train-classes', '6', '--val-classes', '0', '--no-test', '--out', str(root / 'run'),
            *TRAIN, '--epochs', '1']
    assert train_main(args) == 0
    return data, root / 'run' / 'best'


def test_eval_learns_and_applies_post_processing_and_index_search_use_it(trained, tmp_path, capsys):
    from cgd_heads import (CGDModel, PostProcess, RetrievalIndex, Whitening, evaluate_postprocessed,
                           model_fingerprint)
    from cgd_heads.retrieval.extract import load_embeddings
    data, checkpoint = trained
    common = ['--checkpoint', str(checkpoint), '--data', str(data), '--train-classes', '6', '--ks', '1,2',
              '--num-workers', '0', '--quiet']
    steps = ['--dba', '3', '--qe', '2', '--qe-alpha', '3', '--rerank', '4,2,0.3', '--nmi']  # dba != qe: not swapped
    assert eval_main([*common, *steps, '--learn-whitening', 'learned', '--whiten-dim', '8',
                      '--whiten-out', str(tmp_path / 'white'), '--output', str(tmp_path / 'learned.json'),
                      '--save-embeddings', str(tmp_path / 'emb.safetensors')]) == 0
    out = capsys.readouterr().out
    assert 'whitening (learned, 16 -> 8 dims) learned on 36 train images' in out and '| nmi |' in out
    learned = json.loads((tmp_path / 'learned.json').read_text())
    assert learned['postprocess'] == {'whitening': 'learned', 'whiten_dim': 8, 'whiten_shrinkage': 1.0, 'dba': 3,
                                      'qe': 2, 'qe_alpha': 3.0, 'rerank': [4, 2, 0.3]}
    config = CGDModel.from_pretrained(checkpoint).config
    whitening = Whitening.load(tmp_path / 'white', expected_fingerprint=model_fingerprint(config))
    # the printed metrics are the library's on the (raw) saved test embeddings with the same steps
    emb, labels, _, _ = load_embeddings(tmp_path / 'emb.safetensors')
    steps_used = PostProcess(whitening, qe=2, qe_alpha=3.0, dba=3, rerank=(4, 2, 0.3))
    expected = evaluate_postprocessed(emb, labels, steps_used, ks=(1, 2), nmi=True)
    assert {k: learned[k] for k in expected} == pytest.approx(expected)
    # the saved whitening applied again gives the same result
    assert eval_main([*common, *steps, '--whiten', str(tmp_path / 'white'), '--output',
                      str(tmp_path / 'saved.json')]) == 0
    saved = json.loads((tmp_path / 'saved.json').read_text())
    assert {k: saved[k] for k in expected} == pytest.approx(expected)

    assert index_main(['--embeddings', str(tmp_path / 'emb.safetensors'), '--whiten', str(tmp_path / 'white'),
                       '--out', str(tmp_path / 'emb_index')]) == 0
    assert '(16-d whitened to 8-d, flat)' in capsys.readouterr().out
    assert index_main(['--checkpoint', str(checkpoint), '--images', str(data), '--whiten', str(tmp_path / 'white'),
                       '--out', str(tmp_path / 'index'), '--num-workers', '0', '--quiet']) == 0
    index = RetrievalIndex.load(tmp_path / 'index')
    assert (index.dim, index.input_dim, index.whitening.fingerprint) == (8, 16, model_fingerprint(config))
    capsys.readouterr()
    query = data / 'class_07' / '0.png'
    assert search_main([str(query), '--index', str(tmp_path / 'index'), '--k', '3', '--qe', '2', '--qe-alpha', '3',
                        '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['results']
    assert len(top) == 3 and top[0]['path'] == str(query) and top[0]['label'] == 'class_07'


def test_eval_whiten_shrinkage_is_the_power_of_the_fitted_whitening(trained, tmp_path):
    from cgd_heads import Whitening
    from cgd_heads.retrieval.extract import load_embeddings
    data, checkpoint = trained
    assert eval_main(['--checkpoint', str(checkpoint), '--data', str(data), '--train-classes', '6', '--split',
                      'train', '--num-workers', '0', '--quiet', '--learn-whitening', 'learned', '--whiten-dim', '8',
                      '--whiten-shrinkage', '0.5', '--whiten-out', str(tmp_path / 'white'),
                      '--save-embeddings', str(tmp_path / 'train.safetensors')]) == 0
    saved = Whitening.load(tmp_path / 'white')
    emb, labels, _, _ = load_embeddings(tmp_path / 'train.safetensors')  # the train split: what it was fitted on
    reference = Whitening.fit_learned(emb, labels, dim=8, shrinkage=0.5)
    assert saved.shrinkage == 0.5
    np.testing.assert_allclose(saved.projection, reference.projection, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('main, extra, message', [
    (eval_main, ['--rerank', '20,6'], '--rerank must be k1,k2,lambda with positive ints'),
    (eval_main, ['--rerank', '20,6,1.5'], '--rerank must be k1,k2,lambda'),
    (eval_main, ['--qe', '-1'], '--qe must be an int >= 0'),
    (eval_main, ['--qe-alpha', '-2'], '--qe-alpha must be a real >= 0'),
    (eval_main, ['--dba', '-1'], '--dba must be an int >= 0'),
    (eval_main, ['--whiten', 'W', '--learn-whitening', 'pca'], 'pass at most one of --whiten PATH'),
    (eval_main, ['--whiten-dim', '4'], '--whiten-dim, --whiten-shrinkage and --whiten-out need --learn-whitening'),
    (eval_main, ['--learn-whitening', 'pca', '--whiten-shrinkage', '0.5'], '--whiten-shrinkage needs'),
    (eval_main, ['--learn-whitening', 'learned', '--whiten-shrinkage', '2'], '--whiten-shrinkage must be in [0, 1]'),
    (eval_main, ['--learn-whitening', 'pca', '--whiten-dim', '99'], '--whiten-dim must be at most the embedding'),
    (eval_main, ['--whiten', 'OTHER'], 'was learned for another model'),
    (eval_main, ['--whiten', 'MISSING'], '--whiten MISSING is not a folder'),
    (index_main, ['--whiten', 'OTHER'], 'was learned for another model'),
    # options that would be silently ignored: --images reads a folder, not a data set split
    (index_main, ['--split', 'train', '--crop'], '--crop, --split: only with --data ROOT'),
    (index_main, ['--units', 'MISSING', '--train-size', '100'], '--train-size trains inverted lists'),
    (search_main, ['--qe', '-3'], '--qe must be an int >= 0'),
])
def test_post_processing_options_fail_in_one_line(main, extra, message, trained, tmp_path, capsys):
    from cgd_heads import Whitening
    data, checkpoint = trained
    other = Whitening.fit_pca(np.eye(16, dtype=np.float32), dim=4)
    other.save(tmp_path / 'other', fingerprint='sha256:another-model')
    extra = [str(tmp_path / 'other') if a == 'OTHER' else str(tmp_path / 'missing') if a == 'MISSING' else a
             for a in extra]
    message = message.replace('MISSING', str(tmp_path / 'missing'))
    if main is search_main:
        assert index_main(['--checkpoint', str(checkpoint), '--images', str(data), '--out', str(tmp_path / 'index'),
                           '--num-workers', '0', '--quiet']) == 0
        args = [str(data / 'class_00' / '0.png'), '--index', str(tmp_path / 'index'), *extra]
    elif main is index_main:
        args = ['--checkpoint', str(checkpoint), '--images', str(data), '--out', str(tmp_path / 'index'),
                '--num-workers', '0', '--quiet', *extra]
    else:
        args = ['--checkpoint', str(checkpoint), '--data', str(data), '--train-classes', '6', '--num-workers', '0',
                '--quiet', *extra]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ': error: ' in err[0] and message in err[0], err


def test_eval_saves_the_embeddings_of_the_readable_images_and_checks_outputs_first(trained, tmp_path, capsys):
    import shutil
    from cgd_heads.retrieval.extract import load_embeddings
    data, checkpoint = trained
    copy = tmp_path / 'data'
    shutil.copytree(data, copy)
    (copy / 'class_07' / 'broken.png').write_bytes(b'not an image')
    common = ['--checkpoint', str(checkpoint), '--data', str(copy), '--train-classes', '6', '--ks', '1',
              '--num-workers', '0', '--quiet']
    assert eval_main([*common, '--skip-bad-images', '--save-embeddings', str(tmp_path / 'emb.safetensors')]) == 0
    emb, labels, paths, _ = load_embeddings(tmp_path / 'emb.safetensors')
    # the 12 test images that decode, each row with its own path (the broken one left out of all three)
    assert len(emb) == len(labels) == len(paths) == 12 and not any(p.endswith('broken.png') for p in paths)
    capsys.readouterr()
    # an output that cannot be written is refused in one line before anything is embedded
    (tmp_path / 'a_folder').mkdir()
    for option, value in (('--output', tmp_path / 'a_folder'), ('--save-embeddings', tmp_path / 'no' / 'e.st')):
        assert eval_main([*common, option, str(value)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('cgd-eval: error:') and option in err and len(err.splitlines()) == 1


def test_index_refuses_a_checkpoint_other_than_the_one_that_made_the_embeddings(trained, tmp_path, capsys):
    import shutil
    data, checkpoint = trained
    assert eval_main(['--checkpoint', str(checkpoint), '--data', str(data), '--train-classes', '6', '--ks', '1',
                      '--num-workers', '0', '--quiet', '--save-embeddings', str(tmp_path / 'emb.safetensors')]) == 0
    other = tmp_path / 'other'  # the same architecture, other bytes (as another run of the same config would be)
    shutil.copytree(checkpoint, other)
    config = json.loads((other / 'config.json').read_text())
    (other / 'config.json').write_text(json.dumps(dict(config, note='another run')))
    common = ['--embeddings', str(tmp_path / 'emb.safetensors'), '--out']
    assert index_main([*common, str(tmp_path / 'ok'), '--checkpoint', str(checkpoint)]) == 0
    capsys.readouterr()
    assert index_main([*common, str(tmp_path / 'bad'), '--checkpoint', str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'is not the checkpoint that made --embeddings' in err and len(err.splitlines()) == 1
    assert not (tmp_path / 'bad').exists()
