"""``cgd-demo``: train, evaluate, index and search end to end on an embedded data set, in a minute or two on a CPU.

Without ``--data`` the demo writes scikit-learn's bundled handwritten digits (1,797 8x8 images, no download) as an
image folder under ``--out`` (randomly scaled, rotated and shifted, with distractor strokes), trains on digits 0-5
and evaluates zero-shot retrieval on the unseen digits 6-9 against the same network before training. With
``--data`` the same steps run on any data set the readers know (an image folder, CUB200, CARS196, SOP, In-shop,
Omniglot...).

Trained from scratch, CGD's embeddings ``normalize(concat_i normalize(W_i pool_i(X)))`` end up sharing one dominant
direction: nothing in the embedding branch removes a component common to all images (SPoC / GeM pooling of ReLU
maps gives a large one; the bias-free FCs and the L2 norms keep it), and the batch-hard triplet loss, far from
satisfied on features without class structure, falls to its floor (the margin) fastest by amplifying that
component, within the first few updates. The ranking stays informative (Recall@K) but raw cosines are all about 1.
The demo therefore also prints how close same-class and other-class pairs are, and centres the index: it stores
the embeddings minus the mean embedding of the training images (a
:class:`~cgd_heads.retrieval.whitening.Whitening` without scaling, saved with the index and applied to every query),
so the printed scores are cosines of centred embeddings that rank and spread.
"""
from __future__ import annotations

import argparse
import logging
import math
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
from ..retrieval.postprocess import PostProcess
from ..retrieval.unit_index import save_index
from ..retrieval.visualize import save_retrieval_grid
from ..retrieval.whitening import Whitening, model_fingerprint
from ..training.config import TrainConfig
from ..training.trainer import build_model, train
from ..utils.runtime import seed_everything
from ..utils.settings import add_options, config_from_args, count_or_fraction
from .common import eval_transform, evaluate_split, run_cli

__all__ = ['cosine_spread', 'main', 'run', 'write_digits_folder']

_logger = logging.getLogger(__name__)

DIGITS_TRAIN_CLASSES = 6
#: At most this many training images (a seeded random subset) give the mean embedding that centres the index.
CENTRE_IMAGES = 2000
#: At most this many evaluation images (a seeded random subset) give the mean same / other-class cosines.
SPREAD_IMAGES = 2000


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


def _embed(model: torch.nn.Module, image_list: ImageList, data_config: Dict[str, Any], device: str,
           indices: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings and labels of ``image_list`` (only the items ``indices``, when given)."""
    dataset: torch.utils.data.Dataset = ImageDataset(image_list, eval_transform(data_config))
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, list(indices))
    return extract_embeddings(model, dataset, batch_size=256, device=device, progress=False)


def _subset(n: int, limit: int, seed: int) -> Optional[List[int]]:
    """A sorted seeded random choice of ``limit`` of ``n`` items, or None (all) when ``n <= limit``."""
    if n <= limit:
        return None
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def cosine_spread(embeddings: Any, labels: Any) -> Tuple[float, float]:
    """Mean cosine similarity of the pairs of distinct items of the same class, and of different classes.

    Rows are L2-normalised here. A collapsed embedding has both near 1; a useful one has the first clearly above
    the second. NaN where a kind of pair does not exist.
    """
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings), dtype=torch.float64), dim=1)
    y = torch.as_tensor(np.asarray(labels))
    sims = x @ x.T
    same = y[:, None] == y[None, :]
    same.fill_diagonal_(False)
    other = y[:, None] != y[None, :]
    nan = float('nan')
    return (float(sims[same].mean()) if same.any() else nan, float(sims[other].mean()) if other.any() else nan)


def _fmt_cosines(*values: float) -> str:
    """Cosines side by side, all with the decimals that tell the largest from 1: ``0.085 / 0.016``,
    ``0.99992 / 0.99990``."""
    decimals = 5 if max((abs(v) for v in values if not math.isnan(v)), default=0.0) >= 0.995 else 3
    return ' / '.join('n/a' if math.isnan(v) else f'{v:.{decimals}f}' for v in values)


def _centring(model: CGDModel, train: ImageList, data_config: Dict[str, Any], args: argparse.Namespace
              ) -> Optional[Whitening]:
    """``x -> normalize(x - m)``, ``m`` the mean embedding of (up to CENTRE_IMAGES) training images, as a
    Whitening without scaling (a PCA rotation, which leaves cosines unchanged) tagged with the model's
    fingerprint; None when the embeddings do not allow one (all equal)."""
    emb, _ = _embed(model, train, data_config, args.device, _subset(len(train), CENTRE_IMAGES, args.seed))
    try:
        fitted = Whitening.fit_pca(emb.numpy(), whiten=False, normalize=True)
    except ValueError as e:
        _logger.warning('no centring: %s', e)
        return None
    return Whitening(fitted.mean, fitted.projection, fitted.kind, fitted.shrinkage,
                     fingerprint=model_fingerprint(model.config))


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
        given = [flag for flag, set_ in (('--dataset', args.dataset != 'auto'),
                                         ('--train-classes', args.train_classes is not None)) if set_]
        if given:  # they would be silently ignored: the embedded digits have their own split
            raise ValueError(f'{", ".join(given)}: only with --data ROOT (the embedded digits are split '
                             f'{DIGITS_TRAIN_CLASSES} train / {10 - DIGITS_TRAIN_CLASSES} test classes)')
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


def _search_and_draw(model: CGDModel, gallery: ImageList, emb: torch.Tensor, labels: torch.Tensor,
                     whitening: Optional[Whitening], args: argparse.Namespace, checkpoint: Path) -> None:
    """Index the evaluation images (centred by ``whitening``), answer one query, draw a grid of a few queries."""
    out = Path(args.out)
    index = RetrievalIndex.build(emb, labels=labels.tolist(), paths=gallery.paths, whitening=whitening,
                                 metadata={'model': model.config, 'checkpoint': str(checkpoint)})
    save_index(index, out / 'index')
    rng = np.random.default_rng(args.seed)
    picks = rng.choice(len(gallery), size=min(6, len(gallery)), replace=False)
    hits = index.search_hits(emb[picks], k=6)
    hits = [[h for h in row if h.id != q][:5] for q, row in zip(picks.tolist(), hits)]  # drop the query itself
    query_class = int(labels[picks[0]])
    score = 'cosine of centred embeddings' if whitening is not None else 'cosine'
    print(f'\nQuery {gallery.paths[picks[0]]} (class {gallery.class_names[query_class]}): top {len(hits[0])} of '
          f'{len(gallery) - 1}\n(score: {score}; + same class, - other class)')
    for h in hits[0]:
        print(f'  {"+" if h.label == query_class else "-"} {h.score:7.4f}  class {gallery.class_names[h.label]}  '
              f'{h.path}')
    grid = save_retrieval_grid([gallery.paths[i] for i in picks], [int(labels[i]) for i in picks],
                               [[h.path for h in row] for row in hits], [[h.label for h in row] for row in hits],
                               out / 'retrieval_grid.png')
    print(f'\nCheckpoint: {checkpoint}  index: {out / "index"}  grid: {grid}')


def run(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """The demo: evaluate the untrained network, train, evaluate, index, answer a query; returns the table rows
    (``{row name: metrics}``; the rows' ``'cos same'`` / ``'cos other'`` are the mean cosine similarities of
    same-class and other-class pairs of evaluation images)."""
    root, dataset, splits = _demo_splits(args)
    config = config_from_args(TrainConfig, args, progress=not args.quiet, **DEMO_FIXED)
    run_dir = Path(args.out) / 'run'
    if run_dir.exists():  # a demo is a fresh run each time (also after one killed mid-checkpoint): never mix
        shutil.rmtree(run_dir)
    ks = (1, 2, 4, 8)
    gallery_split = 'test' if 'test' in splits else 'gallery'
    gallery = splits[gallery_split]
    spread_items = _subset(len(gallery), SPREAD_IMAGES, args.seed)

    def evaluate(model: CGDModel, whitening: Optional[Whitening] = None,
                 cache: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
        """Recall@K / MAP@R (through ``whitening``), plus the mean same / other-class cosines of the gallery."""
        data_config = data_config_of(model, args.img_size)
        cache = {} if cache is None else cache  # split name -> (embeddings, labels, paths), embedded once

        def embed(name: str, image_list: ImageList) -> Tuple[torch.Tensor, torch.Tensor, List[Optional[str]]]:
            if name not in cache:
                cache[name] = (*_embed(model, image_list, data_config, args.device), image_list.paths)
            return cache[name]

        metrics = evaluate_split(model, splits, data_config, ks=ks, device=args.device, amp='none', batch_size=256,
                                 embed_fn=embed,
                                 postprocess=None if whitening is None else PostProcess(whitening=whitening))
        emb, labels, _ = embed(gallery_split, gallery)
        if spread_items is not None:
            emb, labels = emb[spread_items], labels[spread_items]
        same, other = cosine_spread(emb if whitening is None else whitening.apply(emb.numpy()), labels)
        return dict(metrics, **{'cos same': same, 'cos other': other})

    seed_everything(config.seed)  # the same initialisation train() starts from
    untrained = build_model(config, splits['train'].num_classes)  # classifier size is irrelevant here
    rows = {'untrained (random init)': evaluate(untrained)}
    start = time.time()
    result = train(config, splits['train'], run_dir, extra={'dataset': dataset, 'data_root': str(root)})
    seconds = time.time() - start
    name = f'CGD {args.descriptors}, trained {args.epochs} epochs'
    embedded: Dict[str, Any] = {}
    rows[name] = evaluate(result.model, cache=embedded)
    data_config = data_config_of(result.model, args.img_size)
    whitening = _centring(result.model, splits['train'], data_config, args)
    if whitening is not None:
        rows[f'{name}, centred'] = evaluate(result.model, whitening, cache=embedded)
    queries = len(splits['test']) if 'test' in splits else len(splits['query'])
    print(f'\nZero-shot retrieval on {queries} query images of unseen classes ({args.model_name}, {args.img_size} '
          f'px, {args.embed_dim}-d; training took {seconds:.0f} s):')
    print(_table(rows, ks))
    print('\nMean cosine similarity between evaluation images, same class / different classes:')
    print('\n'.join(f'  {row}: {_fmt_cosines(m["cos same"], m["cos other"])}' for row, m in rows.items()))
    if whitening is not None:
        print('Raw CGD embeddings share one large common component (all cosines near 1); "centred" subtracts the '
              'mean\nembedding of the training images, as the index below does.')
    emb, labels, _ = embedded[gallery_split]
    _search_and_draw(result.model, gallery, emb, labels, whitening, args, result.best_dir)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return run_cli('cgd-demo', lambda: run(_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
