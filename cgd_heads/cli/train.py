"""``cgd-train``: train a CGD model on a data set, select on held-out training classes, evaluate on the test split.

Its options are the fields of :class:`~cgd_heads.training.config.TrainConfig` (same names, help and defaults).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from ..models.checkpoint import load_config
from ..training.config import TrainConfig
from ..training.trainer import train
from ..utils.atomic import atomic_write_json
from ..utils.settings import add_options, config_from_args
from .common import (RUNTIME_FIELDS, add_data_args, add_runtime_args, check_out_dir, evaluate_split,
                     load_data_splits, print_metrics, run_cli, runtime_kwargs)

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-train', description='Train a CGD model (defaults: the CGD recipe).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_args(p)
    p.add_argument('--out', required=True, help='run folder (checkpoints last/ and best/, metrics.jsonl)')
    p.add_argument('--resume', action='store_true', help='continue the run in --out')
    p.add_argument('--no-test', action='store_true', help='do not evaluate the selected model on the test split')
    settings = p.add_argument_group('training settings (TrainConfig)')
    add_options(settings, TrainConfig, only=[name for name in TrainConfig.__dataclass_fields__
                                             if name not in RUNTIME_FIELDS])
    add_runtime_args(p)
    return p


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_out_dir(out)
    config = config_from_args(TrainConfig, args, eval_batch_size=args.batch_size, progress=not args.quiet)
    splits = load_data_splits(args)
    if 'train' not in splits:
        raise ValueError(f'{args.data} has no train split (it has {sorted(splits)}); for an image folder pass '
                         f'--train-classes N')
    result = train(config, splits['train'], out, resume=args.resume, skip_bad_images=args.skip_bad_images,
                   extra={'dataset': args.dataset, 'data_root': str(Path(args.data).resolve())})
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
    return run_cli('cgd-train', lambda: run(build_parser().parse_args(argv)))
