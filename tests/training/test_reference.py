"""The off-the-shelf reference of a training run, checked against a naive GeM + nearest-neighbour loop."""
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import cgd_heads.training.trainer as train_module
from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of, load_splits
from cgd_heads.models import create_backbone, create_model
from cgd_heads.training import TrainConfig, off_the_shelf_reference, reference_verdict, train

TINY = dict(model_name='test_resnet', embed_dim=16, img_size=24, resize_size=28, batch_size=8, m_per_class=2,
            epochs=1, lr=1e-3, num_workers=0, progress=False, val_classes=2, eval_batch_size=16, seed=3)


@pytest.fixture
def backbone_weights(tmp_path):
    """A fixed test_resnet backbone (timm state dict), so the reference and the naive loop see the same weights."""
    torch.manual_seed(11)
    path = tmp_path / 'backbone.safetensors'
    save_file({k: v.contiguous() for k, v in timm.create_model('test_resnet', num_classes=0).state_dict().items()},
              str(path))
    return str(path)


def naive_recall_at_1(backbone, image_list, data_config, p):
    """GeM_p of forward_features, L2-normalised, then each image's nearest other image by a Python loop."""
    dataset = ImageDataset(image_list, create_cgd_transform(data_config, False, data_config['img_size']))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        maps = backbone.eval().forward_features(images)
    pooled = maps.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    embeddings = F.normalize(pooled, dim=1)
    labels = list(image_list.labels)
    hits = 0
    for i in range(len(labels)):
        best_j, best_sim = None, -2.0
        for j in range(len(labels)):
            sim = float(embeddings[i] @ embeddings[j])
            if j != i and sim > best_sim:
                best_j, best_sim = j, sim
        hits += labels[best_j] == labels[i]
    return hits / len(labels)


def test_reference_rows_match_a_naive_gem_loop(shapes_folder, backbone_weights):
    val_list = load_splits('folder', shapes_folder)['all']
    config = TrainConfig(**dict(TINY, checkpoint_path=backbone_weights, gem_p=2.0))  # not the default p: it is used
    data_config = data_config_of(create_model('test_resnet', embed_dim=16), 24)
    rows = off_the_shelf_reference(config, val_list, data_config, torch.device('cpu'))
    assert list(rows) == ['off-the-shelf GeM p=2, stride stripped', 'off-the-shelf GeM p=2, stride untouched']
    untouched = timm.create_model('test_resnet', num_classes=0, checkpoint_path=backbone_weights)
    stripped, _, _ = create_backbone('test_resnet', stride_mode='strip', checkpoint_path=backbone_weights)
    expected = {'stripped': naive_recall_at_1(stripped, val_list, data_config, 2.0),
                'untouched': naive_recall_at_1(untouched, val_list, data_config, 2.0)}
    for label, metrics in rows.items():
        assert metrics['recall@1'] == pytest.approx(expected[label.rsplit(' ', 1)[1]], abs=1e-6)
        assert set(metrics) >= {'recall@1', 'recall@8', 'map@r'}
    # an untouched run measures one row only: the two modes would be the same network
    config = TrainConfig(**dict(TINY, checkpoint_path=backbone_weights, stride_mode=None))
    assert list(off_the_shelf_reference(config, val_list, data_config, torch.device('cpu'))) == [
        'off-the-shelf GeM p=3, stride untouched']


def test_no_reference_without_an_off_the_shelf_start(shapes_folder, tmp_path):
    path = tmp_path / 'cgd.safetensors'
    save_file(create_model('test_resnet', embed_dim=16).state_dict(), str(path))
    val_list = load_splits('folder', shapes_folder)['all']
    data_config = data_config_of(create_model('test_resnet', embed_dim=16), 24)
    # a trained CGD model as the starting point, and random weights (a rebuild would be another random network)
    for config in (TrainConfig(**dict(TINY, checkpoint_path=str(path))), TrainConfig(**TINY)):
        assert off_the_shelf_reference(config, val_list, data_config, torch.device('cpu')) == {}


def test_verdict_compares_with_the_better_row():
    reference = {'GeM, stride stripped': {'recall@1': 0.80}, 'GeM, stride untouched': {'recall@1': 0.90}}
    beaten, sentence = reference_verdict(0.91, reference, 'recall@1')
    assert beaten and 'GeM, stride untouched' in sentence and '+1.00 points' in sentence
    beaten, sentence = reference_verdict(0.85, reference, 'recall@1')
    assert not beaten and 'does NOT beat' in sentence and '-5.00 points' in sentence
    assert reference_verdict(0.90, reference, 'recall@1')[0] is False  # a tie is not a win
    # with the query count a gap smaller than the standard error of a difference is called noise
    counted = {'GeM': {'recall@1': 0.92, 'num_queries': 649}}  # se = 100 * sqrt(2 * 0.92 * 0.08 / 649) = 1.51
    beaten, sentence = reference_verdict(0.9215, counted, 'recall@1')
    assert beaten and sentence.endswith('within the noise of 649 held-out queries (standard error of the difference '
                                        '~1.51)')
    assert 'noise' not in reference_verdict(0.95, counted, 'recall@1')[1]
    assert 'noise' in reference_verdict(0.91, counted, 'recall@1')[1]
    assert reference_verdict(None, reference, 'recall@1') is None
    assert reference_verdict(0.9, {}, 'recall@1') is None


def test_train_measures_the_reference_before_the_first_epoch(shapes_folder, backbone_weights, tmp_path, caplog):
    splits = load_splits('folder', shapes_folder)
    config = TrainConfig(**dict(TINY, checkpoint_path=backbone_weights))
    with caplog.at_level('INFO', logger='cgd_heads.training.trainer'):
        result = train(config, splits['all'], tmp_path / 'run')
    saved = json.loads((tmp_path / 'run' / 'reference.json').read_text())
    assert len(saved) == 2
    assert saved == result.reference and len(saved) == 2
    messages = [r.getMessage() for r in caplog.records]
    first_epoch = next(i for i, m in enumerate(messages) if m.startswith('epoch 1:'))
    assert any(m.startswith('before training, off-the-shelf GeM p=3, stride untouched: held-out recall@1')
               for m in messages[:first_epoch])
    top = max(r['recall@1'] for r in saved.values())
    verdict = [r for r in caplog.records if 'the off-the-shelf reference on the held-out classes' in r.getMessage()]
    assert len(verdict) == 1 and (verdict[0].levelname == 'INFO') == (result.best_metric > top)
    # nothing to compare without held-out classes, and the option skips it
    for name, extra in (('all', dict(val_classes=0)), ('skipped', dict(skip_reference=True))):
        other = train(TrainConfig(**dict(TINY, checkpoint_path=backbone_weights, **extra)), splits['all'],
                      tmp_path / name)
        assert other.reference == {} and not (tmp_path / name / 'reference.json').exists()
    # measuring the reference does not change what the run computes (the epochs re-seed every generator)
    timing = ('seconds', 'images_per_s')
    assert ([{k: v for k, v in r.items() if k not in timing} for r in other.history]
            == [{k: v for k, v in r.items() if k not in timing} for r in result.history])
    a = load_file(str(tmp_path / 'run' / 'last' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'skipped' / 'last' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_reference_it_started_with(shapes_folder, backbone_weights, tmp_path, monkeypatch):
    splits = load_splits('folder', shapes_folder)
    config = TrainConfig(**dict(TINY, epochs=2, checkpoint_path=backbone_weights))
    real_append = train_module._append_jsonl

    def crash_after_first_epoch(path, rows):
        real_append(path, rows)
        if len(rows) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, '_append_jsonl', crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(config, splits['all'], tmp_path / 'run')
    monkeypatch.setattr(train_module, '_append_jsonl', real_append)
    saved = json.loads((tmp_path / 'run' / 'reference.json').read_text())
    assert len(saved) == 2

    def measured_again(*args, **kwargs):
        raise AssertionError('the reference was measured again on resume')

    monkeypatch.setattr(train_module, 'off_the_shelf_reference', measured_again)
    result = train(config, splits['all'], tmp_path / 'run', resume=True)
    assert result.reference == saved and len(result.history) == 2


def test_a_fresh_run_measures_again_over_a_stale_reference(shapes_folder, backbone_weights, tmp_path, monkeypatch):
    # a run killed before its first checkpoint leaves reference.json but no last/: a new run in that folder (here
    # with another stride mode) must measure its own reference, not report the other network's
    splits = load_splits('folder', shapes_folder)
    run = tmp_path / 'run'
    run.mkdir()
    stale = {'off-the-shelf GeM p=3, stride stripped': {'recall@1': 0.123, 'map@r': 0.1}}
    (run / 'reference.json').write_text(json.dumps(stale))
    result = train(TrainConfig(**dict(TINY, checkpoint_path=backbone_weights, stride_mode=None)), splits['all'], run)
    assert list(result.reference) == ['off-the-shelf GeM p=3, stride untouched']
    assert json.loads((run / 'reference.json').read_text()) == result.reference
