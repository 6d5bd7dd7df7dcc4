"""``cgd-index``: embed images with a checkpoint (or read saved embeddings, or a units folder) and save a faiss
index. With ``--units DIR`` the images are embedded into work units (also by every process of ``torchrun
--nproc_per_node N``; a rerun finishes an interrupted extraction) and rank 0 builds the index from them, one unit
in memory at a time."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..data import ImageDataset, ImageList, list_images, read_image_folder
from ..data.image_folder import list_class_folders
from ..retrieval.extract import extract_embeddings, load_embeddings
from ..retrieval.index import RetrievalIndex
from ..retrieval.index_types import INDEX_TYPES
from ..retrieval.unit_index import DEFAULT_SHARD_SIZE, SHARDS_FILE, build_index_from_units, save_index
from ..retrieval.units import EmbeddingUnits, checkpoint_fingerprint
from ..retrieval.whitening import Whitening
from ..utils.runtime import amp_dtype, resolve_device
from .common import (add_data_args, add_runtime_args, add_units_args, check_out_dir, check_units_args,
                     embedding_preprocessing, eval_transform, extract_list_units, join_processes, leave_processes,
                     load_checkpoint, load_data_splits, load_whitening, run_cli)

__all__ = ['main', 'build_parser']

#: Index options: command-line dest -> (index type, RetrievalIndex.build keyword).
INDEX_OPTIONS = {'nlist': ('ivf', 'nlist'), 'nprobe': ('ivf', 'nprobe'), 'pq_m': ('ivf', 'pq_m'),
                 'pq_nbits': ('ivf', 'pq_nbits'), 'hnsw_m': ('hnsw', 'M'),
                 'ef_construction': ('hnsw', 'ef_construction'), 'ef_search': ('hnsw', 'ef_search')}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-index', description='Embed images with a checkpoint and save a faiss index.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint', help='checkpoint folder (e.g. RUN/best); not needed with --embeddings')
    p.add_argument('--images', help='index every image in the class sub-folders of this folder (class = sub-folder; '
                                     'images directly in it are left out with a warning; a folder without class '
                                     'sub-folders needs --no-labels)')
    p.add_argument('--no-labels', action='store_true',
                   help='with --images: index every image below the folder, at any depth, without classes (a '
                        'catalogue: sub-folders are storage, not labels); results then carry no label')
    p.add_argument('--embeddings', help='index an embeddings file (cgd-eval --save-embeddings) instead of images')
    add_data_args(p, required=False)
    p.add_argument('--split', default='test', help='with --data: the split to index')
    p.add_argument('--out', required=True, help='index folder to write')
    p.add_argument('--index-type', default='flat', choices=list(INDEX_TYPES),
                   help='faiss index kind: flat is exact; the others trade recall for speed (docs/large-galleries.md)')
    p.add_argument('--whiten', metavar='PATH', help='store the embeddings through this saved whitening (cgd-eval '
                                                    '--whiten-out; learned for this model); searches apply it too')
    o = p.add_argument_group('index options (default: the library defaults, see RetrievalIndex)')
    o.add_argument('--nlist', type=int, metavar='N', help='ivf: number of inverted lists')
    o.add_argument('--nprobe', type=int, metavar='N', help='ivf: lists scanned per query')
    o.add_argument('--pq-m', type=int, metavar='N', help='ivf: PQ sub-quantisers (bytes per vector); none = IVF-Flat')
    o.add_argument('--pq-nbits', type=int, metavar='N', help='ivf: bits per PQ code (8)')
    o.add_argument('--hnsw-m', type=int, metavar='N', help='hnsw: neighbours per node (32)')
    o.add_argument('--ef-construction', type=int, metavar='N', help='hnsw: build-time search depth (40)')
    o.add_argument('--ef-search', type=int, metavar='N', help='hnsw: search depth (64)')
    g = add_units_args(p, 'embed the images into this units folder (finished units are kept; under torchrun every '
                          'process embeds its share), then build the index from it streaming; alone (no --images / '
                          '--data), index an existing units folder')
    g.add_argument('--train-size', type=int, metavar='N',
                   help='ivf with --units: vectors sampled to train (default min(N, max(64 nlist, 65536 with PQ)))')
    g.add_argument('--on-disk', action='store_true',
                   help='ivf with --units: keep the inverted lists in a file in the index folder (memory-mapped)')
    g.add_argument('--shard-size', type=int, default=DEFAULT_SHARD_SIZE, metavar='N',
                   help='with --units: most vectors per shard (flat, hnsw: searched as one) or per part (--on-disk)')
    add_runtime_args(p)
    return p


def _index_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The index options given, checked against --index-type."""
    kwargs = {}
    for dest, (index_type, key) in INDEX_OPTIONS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        option = '--' + dest.replace('_', '-')
        if index_type != args.index_type:
            raise ValueError(f'{option} applies to --index-type {index_type}, not {args.index_type}')
        if value < 1:
            raise ValueError(f'{option} must be a positive int, got {value}')
        kwargs[key] = value
    return kwargs


def _check_units_options(args: argparse.Namespace) -> None:
    check_units_args(args)
    if not args.units and (args.train_size is not None or args.on_disk or args.shard_size != DEFAULT_SHARD_SIZE):
        raise ValueError('--train-size, --on-disk and --shard-size need --units DIR')
    if args.on_disk and args.index_type != 'ivf':
        raise ValueError(f'--on-disk needs --index-type ivf (inverted lists), got {args.index_type}')
    for option in ('train_size', 'shard_size'):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise ValueError(f'--{option.replace("_", "-")} must be a positive int, got {value}')
    if args.units and args.embeddings:
        raise ValueError('pass one of --embeddings FILE and --units DIR')
    if args.train_size is not None and args.index_type != 'ivf':
        raise ValueError(f'--train-size trains inverted lists: it needs --index-type ivf, got {args.index_type}')
    _check_data_options(args)


def _check_data_options(args: argparse.Namespace) -> None:
    """Options that only act on the images read are refused where no images are read, not silently ignored."""
    given = [flag for flag, set_ in (('--dataset', args.dataset != 'auto'),
                                     ('--train-classes', args.train_classes is not None),
                                     ('--crop', args.crop), ('--split', args.split != 'test')) if set_]
    if given and args.data is None:
        raise ValueError(f'{", ".join(given)}: only with --data ROOT (they choose which images are indexed)')
    if args.no_labels and args.images is None:
        raise ValueError('--no-labels: only with --images FOLDER (--data reads a labelled data set; embeddings and '
                         'units keep the labels they were made with)')
    reads_images = args.images is not None or args.data is not None
    if args.skip_bad_images and not reads_images:
        raise ValueError('--skip-bad-images: only with --images or --data (no images are read here)')


def _gallery(args: argparse.Namespace) -> ImageList:
    if (args.images is None) == (args.data is None):
        raise ValueError('pass exactly one of --images FOLDER or --data ROOT')
    if args.images is not None:
        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f'--images {folder} is not a folder')
        if args.no_labels:  # labels 0 only feed the Dataset: the index and units record none
            paths = list_images(folder)
            return ImageList(paths, [0] * len(paths), ['unlabelled'])
        if not list_class_folders(folder):
            raise ValueError(f'--images {folder} has no class sub-folders: pass --no-labels to index its images '
                             f'without classes, or sort them into one folder per class')
        return read_image_folder(folder)['all']
    splits = load_data_splits(args)
    if args.split not in splits:
        raise ValueError(f'the data set has no {args.split!r} split (it has {sorted(splits)})')
    return splits[args.split]


def _index_embeddings_file(args: argparse.Namespace) -> None:
    if args.images or args.data:
        raise ValueError('pass one of --embeddings, --images or --data')
    emb, labels, paths, meta = load_embeddings(args.embeddings)
    if args.checkpoint:  # cgd-search will embed queries with it: it must be the checkpoint that made the file
        recorded, given = meta.get('checkpoint_fingerprint'), checkpoint_fingerprint(args.checkpoint)
        if recorded is not None and recorded != given:
            raise ValueError(f'--checkpoint {args.checkpoint} is not the checkpoint that made --embeddings '
                             f'{args.embeddings} (its weights or config differ): queries embedded with it would not '
                             f'be comparable; pass the checkpoint given to cgd-eval')
    metadata = dict(meta, checkpoint=str(Path(args.checkpoint).resolve())) if args.checkpoint else meta
    whitening = None
    if args.whiten:
        if not isinstance(metadata.get('model'), dict):
            raise ValueError(f'--whiten needs the model config to check the whitening against, but --embeddings '
                             f'{args.embeddings} records none (write it with cgd-eval --save-embeddings)')
        whitening = load_whitening(args.whiten, metadata['model'])
    index = RetrievalIndex.build(emb, labels=None if labels is None else labels.tolist(), paths=paths,
                                 index_type=args.index_type, metadata=metadata, whitening=whitening,
                                 **_index_kwargs(args))
    save_index(index, args.out)  # replaces a sharded index saved there before
    print(f'indexed {len(index)} embeddings ({_dims(index)}, {args.index_type}) -> {args.out}')


def _dims(index: RetrievalIndex) -> str:
    return f'{index.dim}-d' if index.whitening is None else f'{index.input_dim}-d whitened to {index.dim}-d'


def _whitening_for(args: argparse.Namespace, model_config: Any) -> Optional[Whitening]:
    if not args.whiten:
        return None
    if not isinstance(model_config, dict):
        raise ValueError(f'--whiten needs the model config to check the whitening against, but --units {args.units} '
                         f'records none')
    return load_whitening(args.whiten, model_config)


def _index_units(args: argparse.Namespace) -> None:
    """Extract into --units (every rank) unless it is indexed alone, then build the index on rank 0."""
    context = join_processes(args.device)
    if args.images is None and args.data is None:
        if not context.is_main:
            return  # nothing to extract: rank 0 builds alone
        units = EmbeddingUnits.open(args.units)
        if args.checkpoint and checkpoint_fingerprint(args.checkpoint) != units.model_fingerprint:
            raise ValueError(f'--units {args.units} was extracted with another model than --checkpoint '
                             f'{args.checkpoint} (fingerprints differ)')
        model_config, class_names = units.model_config, units.class_names
        whitening = _whitening_for(args, model_config)
    else:
        if not args.checkpoint:
            raise ValueError('--checkpoint is required to embed --images or --data')
        model, data_config = load_checkpoint(args.checkpoint)
        whitening = _whitening_for(args, model.config)  # checked before the extraction
        gallery = _gallery(args)
        units = extract_list_units(model, gallery, data_config, Path(args.units),
                                   checkpoint_fingerprint(args.checkpoint), context, args.unit_size,
                                   device=args.device, amp=args.amp, batch_size=args.batch_size,
                                   num_workers=args.num_workers, progress=not args.quiet,
                                   skip_bad_images=args.skip_bad_images, labelled=not args.no_labels)
        if not context.is_main:
            return
        model_config, class_names = model.config, None if args.no_labels else gallery.class_names
    metadata: Dict[str, Any] = {'model': model_config} if model_config else {}
    if args.checkpoint:
        metadata['checkpoint'] = str(Path(args.checkpoint).resolve())
    if class_names is not None:
        metadata['class_names'] = class_names
    prep = units.manifest.get('preprocessing') or {}
    if 'data_config' in prep:  # how the gallery was embedded (size, flip, scales): cgd-search embeds queries alike
        metadata['preprocessing'] = embedding_preprocessing(prep['data_config'], prep.get('flip', False),
                                                            prep.get('scales', (1.0,)))
    build_index_from_units(units, args.out, args.index_type, whitening=whitening, metadata=metadata,
                           train_size=args.train_size, on_disk=args.on_disk, shard_size=args.shard_size,
                           **_index_kwargs(args))
    shards = Path(args.out) / SHARDS_FILE
    count = len(json.loads(shards.read_text())['shards']) if shards.is_file() else 0
    layout = (f'{count} shard' + 's' * (count > 1)) if count else \
        ('on-disk lists' if args.on_disk else 'one index')
    print(f'indexed {sum(units.unit_counts())} images from {units.num_units} units in {args.units} '
          f'({args.index_type}, {layout}) -> {args.out}')


def run(args: argparse.Namespace) -> None:
    _check_units_options(args)
    index_kwargs = _index_kwargs(args)
    check_out_dir(Path(args.out))
    if args.units:
        try:
            return _index_units(args)
        finally:
            leave_processes()
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
    metadata = {'model': model.config, 'checkpoint': str(Path(args.checkpoint).resolve())}
    if not args.no_labels:
        metadata['class_names'] = dataset.class_names
    index = RetrievalIndex.build(emb, labels=None if args.no_labels else labels.tolist(), paths=dataset.paths,
                                 index_type=args.index_type, metadata=metadata, whitening=whitening, **index_kwargs)
    save_index(index, args.out)  # replaces a sharded index saved there before
    print(f'indexed {len(index)} images ({_dims(index)}, {args.index_type}) -> {args.out}')


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-index', lambda: run(build_parser().parse_args(argv)))
