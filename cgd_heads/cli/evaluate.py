"""``cgd-eval``: Recall@K, precision@1 and MAP@R of a checkpoint on a data set's test split (or query/gallery)."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional

from ..utils.atomic import atomic_write_json
from .common import (add_data_args, add_runtime_args, evaluate_split, load_checkpoint, load_data_splits, parse_floats,
                     parse_ks, print_metrics, run_cli, runtime_kwargs)

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-eval', description='Recall@K, precision@1 and MAP@R of a checkpoint.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', required=True, help='checkpoint folder (e.g. RUN/best)')
    add_data_args(p)
    p.add_argument('--split', default='test', help='split to evaluate (In-shop: query vs gallery automatically)')
    p.add_argument('--ks', type=parse_ks, default=(1, 2, 4, 8), help='K values; SOP style: 1,10,100,1000')
    p.add_argument('--flip', action='store_true', help='average with the horizontally flipped images')
    p.add_argument('--scales', type=parse_floats, default=(1.0,), help='multi-scale factors, e.g. 1,0.7071')
    p.add_argument('--img-size', type=int, default=None, help='default: the size the model was trained at')
    p.add_argument('--output', help='write the metrics as JSON here')
    p.add_argument('--save-embeddings', help='also write the embeddings of the split (.safetensors, for cgd-index)')
    add_runtime_args(p)
    return p


def run(args: argparse.Namespace) -> None:
    model, data_config = load_checkpoint(args.checkpoint, args.img_size)
    metrics = evaluate_split(model, load_data_splits(args), data_config, split=args.split, ks=args.ks,
                             flip=args.flip, scales=args.scales, save_to=args.save_embeddings, **runtime_kwargs(args))
    print_metrics(f'{args.checkpoint} on {args.data} ({args.split}, {metrics["num_queries"]} queries):', metrics)
    if args.output:
        atomic_write_json(args.output, dict(metrics, checkpoint=str(args.checkpoint), data=str(args.data),
                                            split=args.split, flip=args.flip, scales=list(args.scales)))


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-eval', lambda: run(build_parser().parse_args(argv)))
