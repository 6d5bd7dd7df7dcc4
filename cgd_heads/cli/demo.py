"""``cgd-demo``: train, evaluate, index and search end to end on an embedded data set, in a minute or two on a CPU.

Without ``--data`` the demo writes scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as an
image folder under ``--out`` (randomly scaled, rotated and shifted, with distractor strokes), trains on digits 0-5
and evaluates zero-shot retrieval on the unseen digits 6-9 against the same network before training. With
``--data`` the same steps run on any data set the readers know (an image folder, CUB200, CARS196, SOP, In-shop,
Omniglot...).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..data import ImageDataset, ImageList, data_config_of, load_splits
from ..models.cgd_model import CGDModel
from ..retrieval.extract import extract_embeddings
from ..retrieval.index import RetrievalIndex
from ..retrieval.visualize import save_retrieval_grid
from ..training.config import TrainConfig
from ..training.trainer import build_model, train
from ..utils.runtime import seed_everything
from ..utils.settings import add_options, config_from_args, count_or_fraction
from .common import eval_transform, evaluate_split, run_cli

__all__ = ['main', 'write_digits_folder']

DIGITS_TRAIN_CLASSES = 6


def write_digits_folder(root: Path, size: int = 32, seed: int = 0) -> Path:
    """Write scikit-learn's digits as ``root/<digit>/<index>.png``, each randomly scaled, rotated and shifted.

    The raw 8x8 digits are so clean that even an untrained network retrieves them well (Recall@1 ~95%). Placing
    each digit at a random scale (12-26 px), angle (+-30 deg) and position on a ``size`` px canvas with a few
    distractor strokes (fixed seed: the same images every time) leaves a random network far from perfect, so the
    demo shows what training adds. Written once; ``root/.complete`` marks a finished folder.
    """
    from sklearn.datasets import load_digits  # the demo's only use of scikit-learn (extra 'demo')
    done = root / '.complete'
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        side = int(rng.integers(12, 27))
        ink = Image.fromarray((image * 255 / 16).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        ink = np.asarray(ink.rotate(float(rng.uniform(-30, 30)), Image.BILINEAR, expand=True))
        canvas = np.zeros((size, size), dtype=np.uint8)
        h, w = min(ink.shape[0], size), min(ink.shape[1], size)
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        canvas[y:y + h, x:x + w] = np.maximum(canvas[y:y + h, x:x + w], ink[:h, :w])
        for _ in range(int(rng.integers(1, 4))):  # distractor strokes
            (y0, x0), (dy, dx) = rng.integers(0, size, 2), rng.integers(-6, 7, 2)
            for t in np.linspace(0, 1, 12):
                canvas[int(np.clip(y0 + t * dy, 0, size - 1)), int(np.clip(x0 + t * dx, 0, size - 1))] = 200
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - canvas).save(folder / f'{i:04d}.png')  # dark strokes on white
    done.touch()
    return root


def _table(rows: Dict[str, Dict[str, float]], ks: Sequence[int]) -> str:
    keys = [f'recall@{k}' for k in ks] + ['map@r']
    lines = ['| model | ' + ' | '.join(k.replace('recall', 'R').replace('map@r', 'MAP@R') for k in keys) + ' |',
             '|---|' + '---|' * len(keys)]
    for name, metrics in rows.items():
        lines.append(f'| {name} | ' + ' | '.join(f'{100 * metrics[k]:.1f}' for k in keys) + ' |')
    return '\n'.join(lines)


#: The demo's settings where they differ from the CGD recipe: small and fast on a CPU.
DEMO_DEFAULTS = dict(model_name='resnet18', embed_dim=128, img_size=32, epochs=8, batch_size=32, m_per_class=8,
                     lr=3e-3, val_classes=0)
#: TrainConfig fields the demo exposes as options (the rest keep DEMO_FIXED or TrainConfig's defaults).
DEMO_OPTIONS = ('model_name', 'descriptors', 'embed_dim', 'img_size', 'epochs', 'batch_size', 'm_per_class', 'lr',
                'val_classes', 'device', 'seed')
DEMO_FIXED = dict(num_workers=0, sched='cosine', eval_batch_size=256)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-demo', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', help='data set root; default: the embedded digits')
    p.add_argument('--dataset', default='auto', help='reader: auto, folder, cub200, cars196, sop, inshop, omniglot...')
    p.add_argument('--train-classes', type=count_or_fraction, default=None,
                   help='image folders: first N classes (or a fraction) train, the rest test')
    p.add_argument('--out', default='runs/demo', help='output folder (checkpoints, index, grid)')
    add_options(p, TrainConfig, only=DEMO_OPTIONS, defaults=DEMO_DEFAULTS)
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def _demo_splits(args: argparse.Namespace) -> Tuple[Path, str, Dict[str, ImageList]]:
    """(root, reader, splits): the embedded digits, or the data set the options name."""
    if args.data is None:
        root, dataset = write_digits_folder(Path(args.out) / 'digits'), 'folder'
        kwargs: Dict[str, Any] = {'train_classes': DIGITS_TRAIN_CLASSES}
    else:
        root, dataset = Path(args.data), args.dataset
        kwargs = {'train_classes': args.train_classes} if args.train_classes is not None else {}
    splits = load_splits(dataset, root, **kwargs)
    if 'train' not in splits or not ({'test'} <= set(splits) or {'query', 'gallery'} <= set(splits)):
        raise ValueError(f'{root} has splits {sorted(splits)}; the demo needs train and test (image folders: '
                         f'pass --train-classes)')
    return root, dataset, splits


def _search_and_draw(model: CGDModel, gallery: ImageList, data_config: Dict[str, Any], args: argparse.Namespace,
                     checkpoint: Path) -> None:
    """Index the evaluation images, answer one query, draw a grid of a few queries."""
    out = Path(args.out)
    emb, labels = extract_embeddings(model, ImageDataset(gallery, eval_transform(data_config)), batch_size=256,
                                     device=args.device, progress=False)
    index = RetrievalIndex.build(emb, labels=labels.tolist(), paths=gallery.paths,
                                 metadata={'model': model.config, 'checkpoint': str(checkpoint)})
    index.save(out / 'index')
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(gallery), size=min(6, len(gallery)), replace=False)
    hits = index.search_hits(emb[picks], k=6)
    hits = [[h for h in row if h.id != q][:5] for q, row in zip(picks.tolist(), hits)]  # drop the query itself
    print(f'\nQuery {gallery.paths[picks[0]]} (class {gallery.class_names[labels[picks[0]]]}): top 5')
    for h in hits[0]:
        print(f'  {h.score:.4f}  class {gallery.class_names[h.label]}  {h.path}')
    grid = save_retrieval_grid([gallery.paths[i] for i in picks], [int(labels[i]) for i in picks],
                               [[h.path for h in row] for row in hits], [[h.label for h in row] for row in hits],
                               out / 'retrieval_grid.png')
    print(f'\nCheckpoint: {checkpoint}  index: {out / "index"}  grid: {grid}')


def run(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    root, dataset, splits = _demo_splits(args)
    config = config_from_args(TrainConfig, args, progress=not args.quiet, **DEMO_FIXED)
    run_dir = Path(args.out) / 'run'
    if (run_dir / 'last').exists():  # a demo is a fresh run each time; never mix with an earlier one
        shutil.rmtree(run_dir)
    ks = (1, 2, 4, 8)

    def evaluate(model: torch.nn.Module) -> Dict[str, float]:
        return evaluate_split(model, splits, data_config_of(model, args.img_size), ks=ks, device=args.device,
                              amp='none', batch_size=256)

    seed_everything(config.seed)  # the same initialisation train() starts from
    untrained = build_model(config, splits['train'].num_classes)  # classifier size is irrelevant here
    rows = {'untrained (random init)': evaluate(untrained)}
    start = time.time()
    result = train(config, splits['train'], run_dir, extra={'dataset': dataset, 'data_root': str(root)})
    seconds = time.time() - start
    rows[f'CGD {args.descriptors}, trained {args.epochs} epochs'] = evaluate(result.model)
    gallery = splits['test'] if 'test' in splits else splits['gallery']
    queries = len(splits['test']) if 'test' in splits else len(splits['query'])
    print(f'\nZero-shot retrieval on {queries} query images of unseen classes ({args.model_name}, {args.img_size} '
          f'px, {args.embed_dim}-d; training took {seconds:.0f} s):')
    print(_table(rows, ks))
    _search_and_draw(result.model, gallery, data_config_of(result.model, args.img_size), args, result.best_dir)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-demo', lambda: run(_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
