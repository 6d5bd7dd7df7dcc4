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
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .data import ImageDataset, create_cgd_transform, load_splits
from .extract import extract_embeddings
from .index import RetrievalIndex
from .metrics import evaluate_retrieval
from .runtime import seed_everything
from .training import TrainConfig, build_model, data_config_of, train
from .visualize import save_retrieval_grid

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='cgd-demo', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--data', help='data set root; default: the embedded digits')
    p.add_argument('--dataset', default='auto', help='reader: auto, folder, cub200, cars196, sop, inshop, omniglot...')
    p.add_argument('--train-classes', type=float, default=None,
                   help='image folders: first N classes (or a fraction) train, the rest test')
    p.add_argument('--out', default='runs/demo', help='output folder (checkpoints, index, grid)')
    p.add_argument('--model', default='resnet18', help='timm backbone')
    p.add_argument('--descriptors', default='SG')
    p.add_argument('--embed-dim', type=int, default=128)
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--epochs', type=int, default=8)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--m-per-class', type=int, default=8)
    p.add_argument('--lr', type=float, default=3e-3)
    p.add_argument('--val-classes', type=float, default=0,
                   help='training classes held out to select the best epoch (the digits have only 6 to train on)')
    p.add_argument('--device', default='auto')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def run(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    out = Path(args.out)
    if args.data is None:
        root, dataset = write_digits_folder(out / 'digits'), 'folder'
        kwargs = {'train_classes': DIGITS_TRAIN_CLASSES}
    else:
        root, dataset = Path(args.data), args.dataset
        kwargs = {'train_classes': args.train_classes} if args.train_classes is not None else {}
        if args.train_classes is not None and args.train_classes >= 1:
            kwargs['train_classes'] = int(args.train_classes)
    splits = load_splits(dataset, root, **kwargs)
    if 'train' not in splits or not ({'test'} <= set(splits) or {'query', 'gallery'} <= set(splits)):
        raise ValueError(f'{root} has splits {sorted(splits)}; the demo needs train and test (image folders: '
                         f'pass --train-classes)')
    test = splits.get('test')
    config = TrainConfig(
        model_name=args.model, descriptors=args.descriptors, embed_dim=args.embed_dim, img_size=args.img_size,
        epochs=args.epochs, batch_size=args.batch_size, m_per_class=args.m_per_class, lr=args.lr,
        device=args.device, seed=args.seed, val_classes=args.val_classes, num_workers=0, progress=not args.quiet,
        sched='cosine', eval_batch_size=256)
    run_dir = out / 'run'
    if (run_dir / 'last').exists():  # a demo is a fresh run each time; never mix with an earlier one
        import shutil
        shutil.rmtree(run_dir)
    ks = (1, 2, 4, 8)

    def evaluate(model: torch.nn.Module) -> Dict[str, float]:
        data_config = data_config_of(model, args.img_size)
        transform = create_cgd_transform(data_config, False, args.img_size)
        if test is not None:
            emb, labels = extract_embeddings(model, ImageDataset(test, transform), batch_size=256,
                                             device=args.device, progress=False)
            return evaluate_retrieval(emb, labels, ks=ks)
        q, ql = extract_embeddings(model, ImageDataset(splits['query'], transform), device=args.device, progress=False)
        g, gl = extract_embeddings(model, ImageDataset(splits['gallery'], transform), device=args.device,
                                   progress=False)
        return evaluate_retrieval(q, ql, ks=ks, gallery_embeddings=g, gallery_labels=gl)

    seed_everything(config.seed)  # the same initialisation train() starts from
    untrained = build_model(config, splits["train"].num_classes)  # classifier size is irrelevant here
    rows = {'untrained (random init)': evaluate(untrained)}
    start = time.time()
    result = train(config, splits['train'], run_dir, extra={'dataset': dataset, 'data_root': str(root)})
    seconds = time.time() - start
    rows[f'CGD {args.descriptors}, trained {args.epochs} epochs'] = evaluate(result.model)
    print(f'\nZero-shot retrieval on {len(test) if test is not None else len(splits["query"])} query images '
          f'of unseen classes ({args.model}, {args.img_size} px, {args.embed_dim}-d; training took {seconds:.0f} s):')
    print(_table(rows, ks))

    # Index the evaluation images, answer one query, draw a grid of a few queries.
    gallery = test if test is not None else splits['gallery']
    data_config = data_config_of(result.model, args.img_size)
    transform = create_cgd_transform(data_config, False, args.img_size)
    emb, labels = extract_embeddings(result.model, ImageDataset(gallery, transform), batch_size=256,
                                     device=args.device, progress=False)
    index = RetrievalIndex.build(emb, labels=labels.tolist(), paths=gallery.paths,
                                 metadata={'model': result.model.config, 'checkpoint': str(result.best_dir)})
    index.save(out / 'index')
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(gallery), size=min(6, len(gallery)), replace=False)
    hits = index.search_hits(emb[picks], k=6)
    hits = [[h for h in row if h.id != q][:5] for q, row in zip(picks.tolist(), hits)]  # drop the query itself
    first = hits[0]
    print(f'\nQuery {gallery.paths[picks[0]]} (class {gallery.class_names[labels[picks[0]]]}): top 5')
    for h in first:
        print(f'  {h.score:.4f}  class {gallery.class_names[h.label]}  {h.path}')
    grid = save_retrieval_grid([gallery.paths[i] for i in picks], [int(labels[i]) for i in picks],
                               [[h.path for h in row] for row in hits], [[h.label for h in row] for row in hits],
                               out / 'retrieval_grid.png')
    print(f'\nCheckpoint: {result.best_dir}  index: {out / "index"}  grid: {grid}')
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import run_cli  # one error policy for every command
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-demo', lambda: run(_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
