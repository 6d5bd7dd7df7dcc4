"""Checkpoint folders: exact round trip, atomic replacement, clear errors for foreign or broken files."""
import json

import pytest
import torch

import cgd_heads.models.checkpoint as checkpoint_module
from cgd_heads import CGDModel, create_model
from cgd_heads.utils.atomic import atomic_dir, resolve_dir
from cgd_heads.models import load_config, load_pretrained, load_training_state, save_pretrained


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model('test_resnet', descriptors='GM', embed_dim=32, num_classes=5, learnable_p=True).eval()


def test_round_trip_gives_identical_embeddings(model, tmp_path):
    model.save_pretrained(tmp_path / 'ckpt', extra={'epoch': 4})
    assert sorted(p.name for p in (tmp_path / 'ckpt').iterdir()) == ['config.json', 'model.safetensors']
    loaded = CGDModel.from_pretrained(tmp_path / 'ckpt').eval()
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))
    config = load_config(tmp_path / 'ckpt')
    assert config['epoch'] == 4 and config['model'] == model.config and config['format'] == 'cgd_heads'


def test_training_state_round_trip_without_pickle(model, tmp_path):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    emb, logits = model.train().forward_train(torch.randn(4, 3, 64, 64))
    (emb.sum() + logits.sum()).backward()
    optimizer.step()
    state = {'optimizer': optimizer.state_dict(), 'epoch': 2, 'betas': (0.9, 0.999), 'none': None}
    save_pretrained(model, tmp_path / 'ckpt', training_state=state)
    loaded = load_training_state(tmp_path / 'ckpt')
    assert loaded['epoch'] == 2 and loaded['betas'] == (0.9, 0.999) and loaded['none'] is None
    restored = torch.optim.Adam(model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded['optimizer'])
    for key, value in optimizer.state_dict()['state'].items():
        for name, tensor in value.items():
            assert torch.equal(restored.state_dict()['state'][key][name], tensor)


def test_failed_save_leaves_previous_checkpoint_loadable(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / 'ckpt', extra={'epoch': 1})

    def broken_save(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(checkpoint_module, 'save_model', broken_save)
    with pytest.raises(OSError, match='disk full'):
        model.save_pretrained(tmp_path / 'ckpt', extra={'epoch': 2})
    assert load_config(tmp_path / 'ckpt')['epoch'] == 1
    load_pretrained(tmp_path / 'ckpt')
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt']  # no temporary folder left behind


def test_swap_interrupted_between_renames_is_recovered(model, tmp_path):
    model.save_pretrained(tmp_path / 'ckpt', extra={'epoch': 1})
    (tmp_path / 'ckpt').rename(tmp_path / '.ckpt.previous')  # the state after the first of the two renames
    assert resolve_dir(tmp_path / 'ckpt').name == '.ckpt.previous'
    assert load_config(tmp_path / 'ckpt')['epoch'] == 1
    load_pretrained(tmp_path / 'ckpt')
    with atomic_dir(tmp_path / 'ckpt') as tmp:
        (tmp / 'config.json').write_text('{}')
    assert not (tmp_path / '.ckpt.previous').exists() and (tmp_path / 'ckpt' / 'config.json').exists()


def test_foreign_and_broken_files_give_clear_errors(model, tmp_path):
    with pytest.raises(FileNotFoundError, match='not a cgd_heads checkpoint folder'):
        load_pretrained(tmp_path)
    model.save_pretrained(tmp_path / 'ckpt')
    weights = tmp_path / 'ckpt' / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match='corrupt'):
        load_pretrained(tmp_path / 'ckpt')
    (tmp_path / 'ckpt' / 'config.json').write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match='not a cgd_heads checkpoint config'):
        load_pretrained(tmp_path / 'ckpt')
    (tmp_path / 'ckpt' / 'config.json').write_text('{not json')
    with pytest.raises(ValueError, match='not valid JSON'):
        load_pretrained(tmp_path / 'ckpt')
    with pytest.raises(FileNotFoundError, match='not a training checkpoint'):
        load_training_state(tmp_path / 'ckpt')


def test_config_mismatch_names_the_fields(model, tmp_path):
    model.save_pretrained(tmp_path / 'ckpt')
    expected = dict(model.config, descriptors='SG', embed_dim=64)
    with pytest.raises(ValueError, match="descriptors: 'SG' != 'GM'; embed_dim: 64 != 32"):
        load_pretrained(tmp_path / 'ckpt', expected_config=expected)


def test_weights_that_do_not_match_the_config(model, tmp_path):
    model.save_pretrained(tmp_path / 'ckpt')
    path = tmp_path / 'ckpt' / 'config.json'
    config = json.loads(path.read_text())
    config['model']['embed_dim'] = 64
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match='does not match the model described by config.json'):
        load_pretrained(tmp_path / 'ckpt')


def test_a_reloaded_model_is_in_eval_mode_and_a_plain_call_changes_nothing(model, tmp_path):
    model.save_pretrained(tmp_path / 'ckpt')
    x = torch.randn(4, 3, 64, 64)
    for loaded in (load_pretrained(tmp_path / 'ckpt'), CGDModel.from_pretrained(tmp_path / 'ckpt')):
        assert not loaded.training
        before = {k: v.clone() for k, v in loaded.state_dict().items()}
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))  # BatchNorm on the saved statistics, not the batch's
        assert all(torch.equal(before[k], v) for k, v in loaded.state_dict().items())


def test_training_state_keys_that_flatten_alike_keep_their_own_tensors(model, tmp_path):
    state = {'x': {1: torch.tensor([1.0]), '1': torch.tensor([2.0])},
             'a.b': torch.tensor([3.0]), 'a': {'b': torch.tensor([4.0])}}
    save_pretrained(model, tmp_path / 'ckpt', training_state=state)
    loaded = load_training_state(tmp_path / 'ckpt')
    assert loaded['x'][1].item() == 1.0 and loaded['x']['1'].item() == 2.0
    assert loaded['a.b'].item() == 3.0 and loaded['a']['b'].item() == 4.0


def test_extra_cannot_replace_what_rebuilds_the_model(model, tmp_path):
    with pytest.raises(ValueError, match=r"extra must not hold the keys save_pretrained writes itself, got "
                                         r"\['model'\]"):
        save_pretrained(model, tmp_path / 'ckpt', extra={'model': {'model_name': 'resnet50'}, 'epoch': 1})
    assert not (tmp_path / 'ckpt').exists()
