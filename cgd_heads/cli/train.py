"""``cgd-train``: train a CGD model on a data set, select on held-out training classes, evaluate on the test split.

Its options are the fields of :class:`~cgd_heads.training.config.TrainConfig` (same names, help and defaults).
``--recipe NAME`` replaces those defaults with a named recipe's (:mod:`cgd_heads.training.recipes`); options given
on the command line still win, and ``cgd-train --recipe NAME --help`` shows the defaults it sets.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional

from ..models.checkpoint import load_config
from ..training.config import TrainConfig
from ..training.recipes import RECIPES, recipe_config, recipe_overrides, recipe_settings, resolve_recipe
from ..training.trainer import train
from ..utils.atomic import atomic_write_json
from ..utils.settings import add_options
from .common import (RUNTIME_FIELDS, add_data_args, add_runtime_args, check_out_dir, evaluate_split,
                     load_data_splits, print_metrics, run_cli, runtime_kwargs)

__all__ = ['main', 'build_parser', 'parse_args', 'train_config']

log = logging.getLogger(__name__)


class _RecipeParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose defaults are those of the ``--recipe`` on the command line being parsed, so that
    the options given (in any order) override the recipe, and ``--help`` shows its values."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else list(args)  # read once: args may be an iterator
        self.set_defaults(**getattr(self, 'base_defaults', {}))
        name = _peek_recipe(args)
        if name in RECIPES:  # anything else: the full parse below reports it, with the usage
            self.set_defaults(**recipe_settings(name))
        return super().parse_known_args(args, namespace)


class _PeekError(Exception):
    pass


class _Peek(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # e.g. a bare --recipe: not ours to report
        raise _PeekError(message)


def _peek_recipe(argv: List[str]) -> str:
    peek = _Peek(add_help=False)
    peek.add_argument('--recipe', default='paper')  # no choices: the full parser checks the name
    try:
        return peek.parse_known_args(argv)[0].recipe
    except _PeekError:
        return 'paper'


def build_parser() -> argparse.ArgumentParser:
    """The ``cgd-train`` parser; a ``--recipe`` on the command line replaces the training settings' defaults."""
    p = _RecipeParser(prog='cgd-train', description='Train a CGD model (defaults: the CGD recipe, or --recipe).',
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument('--recipe', choices=RECIPES, default='paper',
                   help="named defaults for the training settings, overridden by the options given: paper = the CGD "
                        "paper's; cpu-bf16 / cpu-fp32 = the 2-core CPU budget recipe (EfficientNet-Lite0 from pip "
                        "ImageNet weights, 224 px, 16 bf16 / 6 float32 epochs of 30 updates); cpu = cpu-bf16 where "
                        "the CPU has bf16 instructions, else cpu-fp32")
    p.add_argument('--out', required=True, help='run folder (checkpoints last/ and best/, metrics.jsonl)')
    p.add_argument('--resume', action='store_true', help='continue the run in --out')
    p.add_argument('--no-test', action='store_true', help='do not evaluate the selected model on the test split')
    settings = p.add_argument_group('training settings (TrainConfig)')
    add_options(settings, TrainConfig, only=[name for name in TrainConfig.__dataclass_fields__
                                             if name not in RUNTIME_FIELDS])
    add_runtime_args(p)
    keys = {key for name in RECIPES for key in recipe_settings(name)}
    p.base_defaults = {key: p.get_default(key) for key in keys}  # type: ignore[attr-defined]
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``cgd-train``'s command line."""
    return build_parser().parse_args(argv)


def _given(args: argparse.Namespace) -> Dict[str, Any]:
    """The parsed training settings that differ from the recipe's: what the command line changed."""
    values = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    return recipe_overrides(args.recipe, values)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The run's ``TrainConfig``: the recipe's values with the options given on top (:func:`recipe_config`)."""
    return recipe_config(args.recipe, **_given(args), eval_batch_size=args.batch_size, progress=not args.quiet)


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_out_dir(out)
    config = train_config(args)
    recipe = resolve_recipe(args.recipe)
    if recipe != 'paper' and os.environ.get('RANK', '0') == '0':  # torchrun: once, not per rank
        changed = ', '.join(f'{k}={v}' for k, v in _given(args).items())
        log.info('recipe %s%s%s', args.recipe, f' ({recipe} on this CPU)' if recipe != args.recipe else '',
                 f'; changed by the options given: {changed}' if changed else '')
    splits = load_data_splits(args)
    if 'train' not in splits:
        raise ValueError(f'{args.data} has no train split (it has {sorted(splits)}); for an image folder pass '
                         f'--train-classes N')
    result = train(config, splits['train'], out, resume=args.resume, skip_bad_images=args.skip_bad_images,
                   extra=dict({'dataset': args.dataset, 'data_root': str(Path(args.data).resolve())},
                              **({'recipe': recipe} if recipe != 'paper' else {})))
    if not result.is_main:  # torchrun: rank 0 reports and evaluates, the other ranks are done
        return
    print(f'best checkpoint: {result.best_dir} (validation {config.select_metric} = {result.best_metric})')
    if not args.no_test and ('test' in splits or 'query' in splits):
        data_config = load_config(result.best_dir)['data']
        metrics = evaluate_split(result.model, splits, data_config, **runtime_kwargs(args))
        atomic_write_json(out / 'test_metrics.json', dict(metrics, checkpoint=str(result.best_dir)))
        print_metrics(f'test split ({metrics["num_queries"]} queries):', metrics)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-train', lambda: run(parse_args(argv)))
