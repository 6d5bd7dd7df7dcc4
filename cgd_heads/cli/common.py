"""What every command shares: the error policy, the data and runtime options, loading a checkpoint once, and
evaluating a model on a split (test, or query vs gallery where the data set has them)."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..data import BadImageError, ImageDataset, ImageList, create_cgd_transform, load_splits
from ..data.image_io import verify_image
from ..models.cgd_model import CGDModel, load_pretrained
from ..retrieval.distributed_extract import extract_units, rank_device
from ..retrieval.extract import extract_embeddings, save_embeddings
from ..retrieval.metrics import DEFAULT_KS, evaluate_retrieval
from ..retrieval.postprocess import PostProcess, evaluate_postprocessed
from ..retrieval.units import DEFAULT_UNIT_SIZE, MANIFEST_FILE, NO_LABEL, EmbeddingUnits
from ..retrieval.whitening import Whitening, model_fingerprint
from ..training.config import TrainConfig
from ..utils.checks import check_bool
from ..utils.distributed import DistributedContext, init_distributed
from ..utils.runtime import amp_dtype, resolve_device
from ..utils.settings import add_options, count_or_fraction

__all__ = ['RUNTIME_FIELDS', 'run_cli', 'parse_ks', 'parse_floats', 'parse_rerank', 'check_qe', 'add_data_args',
           'load_data_splits', 'add_runtime_args', 'check_out_dir', 'check_out_file', 'load_checkpoint',
           'load_whitening', 'eval_transform', 'embed_split', 'evaluate_split', 'runtime_kwargs', 'print_metrics',
           'add_units_args', 'check_units_args', 'join_processes', 'leave_processes', 'extract_list_units',
           'resolve_eval_splits', 'embedding_preprocessing']

#: Embeddings as :func:`evaluate_split` gets them for a split: ``(name, image_list) -> (embeddings, labels, paths)``.
EmbedFn = Callable[[str, ImageList], Tuple[torch.Tensor, torch.Tensor, List[Optional[str]]]]

_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
                BadImageError, FloatingPointError, KeyError, ImportError)
#: The TrainConfig fields every command takes as runtime options (same names, help and defaults as cgd-train's).
RUNTIME_FIELDS = ('device', 'amp', 'batch_size', 'num_workers')


def run_cli(prog: str, fn: Callable[[], Any]) -> int:
    """Run ``fn``; user errors become one line on stderr and exit status 2, Ctrl-C exit status 130.

    Set ``CGD_HEADS_DEBUG=1`` to see the traceback instead.
    """
    try:
        fn()
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if os.environ.get('CGD_HEADS_DEBUG'):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f'{prog}: error: {message}', file=sys.stderr)
        return 2
    return 0


def parse_ks(text: str) -> Tuple[int, ...]:
    """``'1,2,4,8'`` -> (1, 2, 4, 8), positive integers."""
    try:
        ks = tuple(int(k) for k in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers such as 1,2,4,8, got {text!r}') from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f'K values must be positive, got {text!r}')
    return ks


def parse_floats(text: str) -> Tuple[float, ...]:
    """``'1,0.75'`` -> (1.0, 0.75): positive finite numbers (scale factors)."""
    try:
        values = tuple(float(s) for s in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers such as 1,0.75, got {text!r}') from None
    if not all(math.isfinite(v) and v > 0 for v in values):  # refused here, not after the model has loaded
        raise argparse.ArgumentTypeError(f'expected positive finite numbers such as 1,0.75, got {text!r}')
    return values


def parse_rerank(text: str) -> Tuple[int, int, float]:
    """``'20,6,0.3'`` -> (20, 6, 0.3): the ``--rerank k1,k2,lambda`` option, raising a ValueError that names it."""
    valid = 'k1,k2,lambda with positive ints k1, k2 and a real lambda in [0, 1], e.g. 20,6,0.3'
    parts = text.split(',')
    try:
        k1, k2, lambda_value = int(parts[0]), int(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        raise ValueError(f'--rerank must be {valid}, got {text!r}') from None
    if len(parts) != 3 or k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f'--rerank must be {valid}, got {text!r}')
    return k1, k2, lambda_value


def check_qe(qe: int, qe_alpha: float) -> None:
    """Raise a ValueError naming ``--qe`` / ``--qe-alpha`` unless ``qe >= 0`` and ``qe_alpha`` is a real >= 0."""
    if qe < 0:
        raise ValueError(f'--qe must be an int >= 0 (neighbours of query expansion, 0 = none), got {qe}')
    if not (math.isfinite(qe_alpha) and qe_alpha >= 0):
        raise ValueError(f'--qe-alpha must be a real >= 0 (0 = average QE; 3 is usual), got {qe_alpha}')


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument('--data', required=required, help='data set root folder (or CSV file for --dataset csv)')
    p.add_argument('--dataset', default='auto',
                   help='reader: auto, folder, csv, cub200, cars196, sop, inshop, omniglot, caltech101')
    p.add_argument('--train-classes', type=count_or_fraction, default=None,
                   help='image folders: the first N classes (sorted case-insensitively), or a fraction, train; '
                        'the rest are the test split')
    p.add_argument('--crop', action='store_true', help='CUB200/CARS196: crop images to their bounding boxes')
    p.add_argument('--skip-bad-images', action='store_true', help='skip (and log) unreadable images')


def load_data_splits(args: argparse.Namespace) -> Dict[str, ImageList]:
    """The splits the data options of :func:`add_data_args` describe."""
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f'--data {data} does not exist')
    kwargs: Dict[str, Any] = {}
    if args.train_classes is not None:
        kwargs['train_classes'] = args.train_classes
    if args.crop:
        kwargs['crop'] = True
    try:
        return load_splits(args.dataset, data, **kwargs)
    except TypeError as e:  # a reader without that keyword: name the flag, not the reader's argument
        flags = [flag for flag, key in (('--train-classes', 'train_classes'), ('--crop', 'crop'))
                 if key in kwargs and repr(key) in str(e)]
        if not flags:
            raise
        raise ValueError(f'{" ".join(flags)} does not apply to the reader of --data {data} (--dataset '
                         f'{args.dataset}): --train-classes is for class folders (folder), --crop for cub200 and '
                         f'cars196') from e


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_options(p, TrainConfig, only=RUNTIME_FIELDS)
    p.add_argument('--quiet', action='store_true', help='no progress bars')


def check_out_dir(out: Path) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path('.'))
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise PermissionError(f'--out {out}: {probe} is not a writable folder')


def check_out_file(path: Optional[str], option: str) -> None:
    """One-line error before any work when ``option``'s file cannot be written: an existing folder, or a parent that
    is missing or not writable (the atomic write needs the parent; creating it is left to the user)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f'{option} {target}: a folder, not a file path')
    parent = target.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PermissionError(f'{option} {target}: {parent} is not a writable folder')


def load_checkpoint(directory: str, img_size: Optional[int] = None) -> Tuple[CGDModel, Dict[str, Any]]:
    """The model of a checkpoint folder and its data config (``img_size`` overrides the trained size)."""
    model, config = load_pretrained(directory, return_config=True)
    data_config = dict(config.get('data') or {})
    if img_size:
        data_config['img_size'] = img_size
    if 'img_size' not in data_config:
        raise ValueError(f'{directory} records no image size (no "data" in config.json); pass --img-size')
    return model, data_config


def load_whitening(path: str, model_config: Dict[str, Any], option: str = '--whiten') -> Whitening:
    """A saved whitening folder, refused unless it was learned for this model config (its fingerprint)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f'{option} {folder} is not a folder (a whitening saved by cgd-eval --whiten-out)')
    whitening = Whitening.load(folder)
    expected = model_fingerprint(model_config)
    if whitening.fingerprint != expected:
        raise ValueError(f'{option} {folder} was learned for another model (fingerprint {whitening.fingerprint}, '
                         f'the checkpoint has {expected}); learn one with cgd-eval --learn-whitening --whiten-out')
    return whitening


def eval_transform(data_config: Dict[str, Any]) -> Callable:
    """The evaluation transform of a checkpoint's data config."""
    return create_cgd_transform(data_config, False, data_config['img_size'])


def embed_split(model: torch.nn.Module, image_list: ImageList, data_config: Dict[str, Any], flip: bool = False,
                scales: Sequence[float] = (1.0,), device: str = 'auto', amp: str = 'auto', batch_size: int = 128,
                num_workers: int = 0, progress: bool = False,
                skip_bad_images: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and labels of ``image_list`` with the evaluation transform of ``data_config``."""
    emb, labels, _ = _embed_with_paths(model, image_list, data_config, flip, scales, device, amp, batch_size,
                                       num_workers, progress, skip_bad_images)
    return emb, labels


def _embed_with_paths(model: torch.nn.Module, image_list: ImageList, data_config: Dict[str, Any], flip: bool,
                      scales: Sequence[float], device: str, amp: str, batch_size: int, num_workers: int,
                      progress: bool, skip_bad_images: bool) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """:func:`embed_split` plus the paths embedded (``skip_bad_images`` may have left some of the list out)."""
    torch_device = resolve_device(device)
    dataset = ImageDataset(image_list, eval_transform(data_config), skip_bad_images=skip_bad_images)
    emb, labels = extract_embeddings(model, dataset, batch_size=batch_size, device=torch_device, flip=flip,
                                     scales=scales, num_workers=num_workers, amp_dtype=amp_dtype(amp, torch_device),
                                     progress=progress)
    return emb, labels, list(dataset.image_list.paths)


def resolve_eval_splits(splits: Dict[str, ImageList], split: str = 'test') -> List[str]:
    """The splits :func:`evaluate_split` embeds for ``split``: ``[split]``, or ``['query', 'gallery']`` for a data
    set with those instead of a test split (In-shop); a ValueError names a missing or empty split."""
    if split == 'test' and 'test' not in splits and {'query', 'gallery'} <= set(splits):
        split = 'query'  # In-shop: queries against the gallery
    if split not in splits:
        raise ValueError(f'the data set has no {split!r} split (it has {sorted(splits)}); for an image folder '
                         f'pass --train-classes so the remaining classes form the test split')
    if len(splits[split]) == 0 or splits[split].num_classes == 0:
        raise ValueError(f'the {split!r} split is empty: no evaluation classes')
    return ['query', 'gallery'] if split == 'query' else [split]


def evaluate_split(model: torch.nn.Module, splits: Dict[str, ImageList], data_config: Dict[str, Any],
                   split: str = 'test', ks: Sequence[int] = DEFAULT_KS, flip: bool = False,
                   scales: Sequence[float] = (1.0,), save_to: Optional[str] = None, device: str = 'auto',
                   amp: str = 'auto', batch_size: int = 128, num_workers: int = 0, progress: bool = False,
                   skip_bad_images: bool = False, postprocess: Optional[PostProcess] = None,
                   nmi: bool = False, embed_fn: Optional[EmbedFn] = None,
                   save_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Recall@K and MAP@R of ``model`` on ``splits[split]``, query-vs-rest; query vs gallery for a data set with
    those splits instead of a test split (In-shop). ``save_to`` also writes the split's embeddings (the gallery's
    for query/gallery splits; before any post-processing; with the image size, flip and scales that made them, see
    :func:`embedding_preprocessing`); ``postprocess`` scores the post-processed ranking instead, ``nmi`` adds NMI.
    ``embed_fn`` supplies the embeddings (e.g. read from units) instead of extracting them here; ``save_metadata``
    adds entries to the saved file's metadata (cgd-eval: the checkpoint's fingerprint)."""

    def embed(name: str) -> Tuple[torch.Tensor, torch.Tensor, List[Optional[str]]]:
        if embed_fn is not None:
            return embed_fn(name, splits[name])
        return _embed_with_paths(model, splits[name], data_config, flip, scales, device, amp, batch_size,
                                 num_workers, progress, skip_bad_images)

    def score(q: torch.Tensor, ql: torch.Tensor, g: Optional[torch.Tensor] = None,
              gl: Optional[torch.Tensor] = None) -> Dict[str, float]:
        if postprocess is None:
            return evaluate_retrieval(q, ql, ks=ks, gallery_embeddings=g, gallery_labels=gl, nmi=nmi)
        return evaluate_postprocessed(q, ql, postprocess, ks=ks, gallery_embeddings=g, gallery_labels=gl, nmi=nmi)

    def save(name: str, emb: torch.Tensor, labels: torch.Tensor, paths: List[Optional[str]]) -> None:
        metadata: Dict[str, Any] = {'model': getattr(model, 'config', {}), 'class_names': splits[name].class_names,
                                    **(save_metadata or {})}
        if embed_fn is None:  # how the images were embedded, so cgd-search embeds its queries the same way
            metadata['preprocessing'] = embedding_preprocessing(data_config, flip, scales)
        save_embeddings(save_to, emb, labels, paths, metadata)

    names = resolve_eval_splits(splits, split)
    if names == ['query', 'gallery']:
        (q, ql, _), (g, gl, gallery_paths) = embed('query'), embed('gallery')
        if save_to:  # the gallery: what an index is built from
            save('gallery', g, gl, gallery_paths)
        return score(q, ql, g, gl)
    emb, labels, paths = embed(names[0])
    if save_to:
        save(names[0], emb, labels, paths)
    return score(emb, labels)


def embedding_preprocessing(data_config: Dict[str, Any], flip: bool = False,
                            scales: Sequence[float] = (1.0,)) -> Dict[str, Any]:
    """What decides an image's embedding besides the weights (image size, flip and scale views), as saved beside
    embeddings and indexes: queries must be embedded the same way to be comparable."""
    return {'img_size': int(data_config['img_size']), 'flip': bool(flip), 'scales': [float(s) for s in scales]}


def add_units_args(p: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """``--units DIR`` and ``--unit-size N``: extraction into work units, also under torchrun."""
    g = p.add_argument_group('large galleries: embedding units, also under torchrun --nproc_per_node N')
    g.add_argument('--units', metavar='DIR', help=what)
    g.add_argument('--unit-size', type=int, default=None, metavar='N',
                   help=f'images per unit when DIR is created (default {DEFAULT_UNIT_SIZE}; an existing DIR keeps '
                        f'its own)')
    return g


def check_units_args(args: argparse.Namespace) -> None:
    """One-line errors for the units options, and for torchrun without ``--units`` (every rank would redo all)."""
    if args.unit_size is not None and args.unit_size < 1:
        raise ValueError(f'--unit-size must be a positive int, got {args.unit_size}')
    if args.unit_size is not None and not args.units:
        raise ValueError('--unit-size needs --units DIR')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 and not args.units:
        raise ValueError('under torchrun pass --units DIR: the processes share the work through its units')


def join_processes(device: str) -> DistributedContext:
    """The torchrun process group (one process without torchrun)."""
    return init_distributed(resolve_device(device).type)


def leave_processes() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def extract_list_units(model: torch.nn.Module, image_list: ImageList, data_config: Dict[str, Any], directory: Path,
                       fingerprint: str, context: DistributedContext, unit_size: Optional[int] = None,
                       flip: bool = False, scales: Sequence[float] = (1.0,), device: str = 'auto', amp: str = 'auto',
                       batch_size: int = 128, num_workers: int = 0, progress: bool = False,
                       skip_bad_images: bool = False, labelled: bool = True) -> EmbeddingUnits:
    """Embed ``image_list`` into the units folder ``directory`` with the evaluation transform (collective under
    torchrun); unreadable images are skipped (and recorded in their unit) with ``skip_bad_images``; with
    ``labelled=False`` the list's labels are not recorded (every unit stores NO_LABEL, the manifest no class
    names)."""
    torch_device = rank_device(device, context)
    if unit_size is None:
        manifest = Path(directory) / MANIFEST_FILE
        unit_size = json.loads(manifest.read_text())['unit_size'] if manifest.is_file() else DEFAULT_UNIT_SIZE
    boxes = None if image_list.boxes is None else \
        'sha256:' + hashlib.sha256(json.dumps(image_list.boxes).encode()).hexdigest()
    paths = image_list.paths
    check_item = (lambda i: verify_image(paths[i])) if check_bool(skip_bad_images, 'skip_bad_images') else None
    return extract_units(
        model, ImageDataset(image_list, eval_transform(data_config)), directory, paths,
        image_list.labels if labelled else [NO_LABEL] * len(paths),
        fingerprint=fingerprint, preprocessing={'data_config': data_config, 'boxes': boxes}, unit_size=unit_size,
        batch_size=batch_size, device=torch_device, flip=flip, scales=scales, num_workers=num_workers,
        amp_dtype=amp_dtype(amp, torch_device), progress=progress,
        check_item=check_item, context=context,
        class_names=image_list.class_names if labelled else None)


def runtime_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The runtime options of :func:`add_runtime_args` as :func:`evaluate_split` keywords."""
    return dict(device=args.device, amp=args.amp, batch_size=args.batch_size, num_workers=args.num_workers,
                progress=not args.quiet, skip_bad_images=getattr(args, 'skip_bad_images', False))


def print_metrics(title: str, metrics: Dict[str, float]) -> None:
    keys = [k for k in metrics if k.startswith('recall@')] + ['precision@1', 'map@r'] + \
        (['nmi'] if 'nmi' in metrics else [])
    print(title)
    print('| ' + ' | '.join(keys) + ' |\n|' + '---|' * len(keys))
    print('| ' + ' | '.join(f'{100 * metrics[k]:.2f}' for k in keys) + ' |')
