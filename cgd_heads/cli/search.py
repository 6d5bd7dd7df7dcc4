"""``cgd-search``: the top-k gallery images of an index for query images, as text, JSON or a retrieval grid."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data import ImageDataset, ImageList
from ..retrieval.extract import extract_embeddings
from ..retrieval.index import SearchHit
from ..retrieval.shards import ShardedIndex
from ..retrieval.unit_index import load_index
from ..retrieval.visualize import save_retrieval_grid
from .common import check_qe, embedding_preprocessing, eval_transform, load_checkpoint, run_cli

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-search', description='Top-k gallery images for query images.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('queries', nargs='+', help='query image files')
    p.add_argument('--index', required=True, help='index folder written by cgd-index (one index, or shards)')
    p.add_argument('--checkpoint', help='checkpoint folder; default: the one the index was built with')
    p.add_argument('-k', '--k', type=int, default=5, help='gallery items returned per query')
    p.add_argument('--qe', type=int, default=0, metavar='N',
                   help='alpha query expansion over the N best gallery items, then search again; 0 = off')
    p.add_argument('--qe-alpha', type=float, default=0.0, metavar='A',
                   help='weight exponent of --qe (0 = plain average; 3 is usual)')
    p.add_argument('--grid', help='write a retrieval grid PNG here')
    p.add_argument('--json', action='store_true', help='print JSON instead of text')
    p.add_argument('--device', default='auto', help='auto, cpu, cuda or cuda:N (embeds the queries)')
    return p


def _rows(queries: List[str], hits: List[List[SearchHit]], names: List[str]) -> List[Dict[str, Any]]:
    def label(h: SearchHit) -> Any:
        return names[h.label] if h.label is not None and h.label < len(names) else h.label
    return [{'query': q, 'results': [{'rank': r + 1, 'score': round(h.score, 4), 'path': h.path, 'label': label(h)}
                                     for r, h in enumerate(row)]}
            for q, row in zip(queries, hits)]


def run(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise ValueError(f'--k must be >= 1, got {args.k}')
    check_qe(args.qe, args.qe_alpha)
    index = load_index(args.index)
    sharded = isinstance(index, ShardedIndex)
    if sharded and args.qe:
        raise ValueError(f'--qe needs one index, but --index {args.index} holds {len(index.shards)} shards')
    metadata = index.shards[0].metadata if sharded else index.metadata
    checkpoint = args.checkpoint or metadata.get('checkpoint')
    if not checkpoint:
        raise ValueError(f'--index {args.index} does not name its checkpoint; pass --checkpoint')
    model, data_config = load_checkpoint(checkpoint)
    if metadata.get('model') != model.config:  # embeddings of another model would be meaningless
        load_index(args.index, expected_metadata={'model': model.config})  # raises, naming the fields
    # embeddings saved by cgd-eval record their image size, flip and scales: the queries get the same, or their
    # scores would not be comparable with the gallery's
    prep = metadata.get('preprocessing') or embedding_preprocessing(data_config)
    data_config = dict(data_config, img_size=prep['img_size'])
    queries = ImageList([str(Path(q).resolve()) for q in args.queries], [0] * len(args.queries), ['query'])
    emb, _ = extract_embeddings(model, ImageDataset(queries, eval_transform(data_config)), device=args.device,
                                flip=prep['flip'], scales=prep['scales'], progress=False)
    hits = index.search_hits(emb, k=args.k) if sharded else \
        index.search_hits(emb, k=args.k, qe=args.qe, qe_alpha=args.qe_alpha)
    results = _rows(queries.paths, hits, metadata.get('class_names') or [])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for res in results:
            print(res['query'])
            for r in res['results']:
                label = '-' if r['label'] is None else r['label']  # an unlabelled gallery (--no-labels)
                print(f"  {r['rank']:>3}  {r['score']:.4f}  {label}  {r['path']}")
    if args.grid:
        save_retrieval_grid(queries.paths, [None] * len(queries), [[h.path for h in row] for row in hits],
                            [[h.label for h in row] for row in hits], args.grid)
        print(f'grid: {args.grid}')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-search', lambda: run(build_parser().parse_args(argv)))
