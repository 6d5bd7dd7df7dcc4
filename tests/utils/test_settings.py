"""Settings written once: the TrainConfig fields generate cgd-train's options (names, help, defaults, choices)."""
import argparse
import dataclasses

import pytest

from cgd_heads.cli.train import build_parser
from cgd_heads.layers.heads import COMBINE_MODES
from cgd_heads.models.stride import STRIDE_MODES
from cgd_heads.training.config import OPTIMIZERS, SCHEDULES, SELECT_METRICS, TrainConfig
from cgd_heads.training.head_training import HeadTrainConfig
from cgd_heads.utils.runtime import AMP_MODES
from cgd_heads.utils.settings import add_options, config_from_args, setting


def _options(parser):
    return {a.dest: a for a in parser._actions}


def test_every_train_setting_is_an_option_with_its_help_default_and_choices():
    options = _options(build_parser())
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata['cli']:
            assert f.name not in options, f.name
            continue
        option = options[f.name]
        assert option.help == f.metadata['help'] and option.default == f.default, f.name
    assert options['model_name'].option_strings == ['--model']
    for name, constant in (('combine', COMBINE_MODES), ('optimizer', OPTIMIZERS), ('sched', SCHEDULES),
                           ('select_metric', SELECT_METRICS), ('amp', AMP_MODES),
                           ('stride_mode', STRIDE_MODES + (None,))):
        assert tuple(options[name].choices) == constant, name


def test_parsed_options_build_the_config():
    args = build_parser().parse_args(['--data', 'd', '--out', 'o', '--stride-mode', 'none', '--val-classes', '20',
                                      '--head-lr', '1e-3', '--freeze-bn', '--lr', '0.01'])
    config = config_from_args(TrainConfig, args, eval_batch_size=args.batch_size, progress=False)
    assert config == TrainConfig(stride_mode=None, val_classes=20, head_lr=1e-3, freeze_bn=True, lr=0.01,
                                 progress=False)
    assert isinstance(config.val_classes, int)
    assert build_parser().parse_args(['--data', 'd', '--out', 'o', '--val-classes', '0.2']).val_classes == 0.2
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        build_parser().parse_args(['--data', 'd', '--out', 'o', '--sched', 'linear'])


def test_head_only_training_shares_the_settings_with_its_own_defaults():
    shared = {f.name for f in dataclasses.fields(HeadTrainConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    assert {'descriptors', 'embed_dim', 'combine', 'gem_p', 'temperature', 'label_smoothing', 'margin',
            'aux_weight', 'ranking_weight', 'batch_size', 'm_per_class', 'epochs', 'lr', 'seed'} <= shared
    assert (HeadTrainConfig().embed_dim, HeadTrainConfig().lr) == (512, 1e-3)
    assert (TrainConfig().embed_dim, TrainConfig().lr) == (1536, 1e-4)
    with pytest.raises(ValueError, match='nothing to train'):
        HeadTrainConfig(aux_weight=0, ranking_weight=0)
    with pytest.raises(ValueError, match='learnable_p=True cannot be trained on cached features'):
        HeadTrainConfig(learnable_p=True)


def test_add_options_on_a_small_dataclass():
    @dataclasses.dataclass
    class Config:
        size: int = setting(3, 'a size')
        mode: str = setting('a', 'a mode', choices=('a', 'b', None))
        fast: bool = setting(False, 'go fast')
        hidden: int = setting(1, 'set by the program', cli=False)

    parser = argparse.ArgumentParser()
    add_options(parser, Config, defaults={'size': 5})
    assert config_from_args(Config, parser.parse_args([])) == Config(size=5)
    assert config_from_args(Config, parser.parse_args(['--mode', 'none', '--fast']), hidden=2) == \
        Config(mode=None, fast=True, hidden=2, size=5)
    assert '--hidden' not in parser.format_help()
