"""``cgd-index``: embed images with a checkpoint (or read saved embeddings) and save a faiss index."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List, Optional

from ..data import ImageDataset, ImageList, read_image_folder
from ..retrieval.extract import extract_embeddings, load_embeddings
from ..retrieval.index import RetrievalIndex
from ..retrieval.index_types import INDEX_TYPES
from ..utils.runtime import amp_dtype, resolve_device
from .common import (add_data_args, add_runtime_args, check_out_dir, eval_transform, load_checkpoint,
                     load_data_splits, load_whitening, run_cli)

__all__ = ['main', 'build_parser']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-index', description='Embed images with a checkpoint and save a faiss index.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', help='checkpoint folder (e.g. RUN/best); not needed with --embeddings')
    p.add_argument('--images', help='index every image below this folder (class = first sub-folder, if any)')
    p.add_argument('--embeddings', help='index an embeddings file (cgd-eval --save-embeddings) instead of images')
    add_data_args(p, required=False)
    p.add_argument('--split', default='test', help='with --data: the split to index')
    p.add_argument('--out', required=True, help='index folder to write')
    p.add_argument('--index-type', default='flat', choices=list(INDEX_TYPES))
    p.add_argument('--whiten', metavar='PATH', help='store the embeddings through this saved whitening (cgd-eval '
                                                    '--whiten-out; learned for this model); searches apply it too')
    add_runtime_args(p)
    return p


def _gallery(args: argparse.Namespace) -> ImageList:
    if (args.images is None) == (args.data is None):
        raise ValueError('pass exactly one of --images FOLDER or --data ROOT')
    if args.images is not None:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f'--images {folder} is not a folder')
        return read_image_folder(folder)['all']
    splits = load_data_splits(args)
    if args.split not in splits:
        raise ValueError(f'the data set has no {args.split!r} split (it has {sorted(splits)})')
    return splits[args.split]


def _index_embeddings_file(args: argparse.Namespace) -> None:
    if args.images or args.data:
        raise ValueError('pass one of --embeddings, --images or --data')
    emb, labels, paths, meta = load_embeddings(args.embeddings)
    metadata = dict(meta, checkpoint=str(Path(args.checkpoint).resolve())) if args.checkpoint else meta
    whitening = None
    if args.whiten:
        if not isinstance(metadata.get('model'), dict):
            raise ValueError(f'--whiten needs the model config to check the whitening against, but --embeddings '
                             f'{args.embeddings} records none (write it with cgd-eval --save-embeddings)')
        whitening = load_whitening(args.whiten, metadata['model'])
    index = RetrievalIndex.build(emb, labels=None if labels is None else labels.tolist(), paths=paths,
                                 index_type=args.index_type, metadata=metadata, whitening=whitening)
    index.save(args.out)
    print(f'indexed {len(index)} embeddings ({_dims(index)}, {args.index_type}) -> {args.out}')


def _dims(index: RetrievalIndex) -> str:
    return f'{index.dim}-d' if index.whitening is None else f'{index.input_dim}-d whitened to {index.dim}-d'


def run(args: argparse.Namespace) -> None:
    check_out_dir(Path(args.out))
    if args.embeddings:
        return _index_embeddings_file(args)
    if not args.checkpoint:
        raise ValueError('--checkpoint is required to embed --images or --data')
    model, data_config = load_checkpoint(args.checkpoint)
    whitening = load_whitening(args.whiten, model.config) if args.whiten else None
    dataset = ImageDataset(_gallery(args), eval_transform(data_config), skip_bad_images=args.skip_bad_images)
    device = resolve_device(args.device)
    emb, labels = extract_embeddings(model, dataset, batch_size=args.batch_size, device=device,
                                     num_workers=args.num_workers, amp_dtype=amp_dtype(args.amp, device),
                                     progress=not args.quiet)
    index = RetrievalIndex.build(emb, labels=labels.tolist(), paths=dataset.paths, index_type=args.index_type,
                                 metadata={'model': model.config, 'checkpoint': str(Path(args.checkpoint).resolve()),
                                           'class_names': dataset.class_names}, whitening=whitening)
    index.save(args.out)
    print(f'indexed {len(index)} images ({_dims(index)}, {args.index_type}) -> {args.out}')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-index', lambda: run(build_parser().parse_args(argv)))
