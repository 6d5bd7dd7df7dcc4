"""Retrieval post-processing measured (issue 18): what whitening, alpha-QE, DBA and k-reciprocal re-ranking gain on
a trained checkpoint (``--part quality``), and what each step costs in time and memory (``--part cost``).

* quality: the checkpoint embeds the training and test splits once (cached under ``$CGD_HEADS_CACHE``, never beside
  the data). About 20% of the TRAINING classes (fixed seed) are held out as a validation set: every
  hyper-parameter is chosen there (R@1, ties MAP@R; query-vs-rest among the held-out classes), with whitenings
  learned on the other training classes; the test classes (query-vs-rest) are scored once per row with the chosen
  values. Writes ``benchmarks/results/postprocess_<dataset>.md`` (+ ``.json``).
* cost: seconds and peak memory of each step on synthetic clustered unit embeddings (d = 512, ~20 per class),
  every measurement in a fresh subprocess, peak RSS (``VmHWM``) counted above the process with its data loaded.
  Writes ``benchmarks/results/postprocess.md`` (+ ``.json``).

    python benchmarks/postprocess.py --part quality --dataset cars196 --checkpoint runs/cars196/best
    python benchmarks/postprocess.py --part quality --dataset omniglot --checkpoint runs/omniglot/best
    python benchmarks/postprocess.py --part cost                       # 20k, 60k, 120k items
    python benchmarks/postprocess.py --part cost --quick --output /tmp/pp_cost.md   # smoke run, seconds

The script only calls the library (:class:`~cgd_heads.retrieval.postprocess.PostProcess`,
:func:`~cgd_heads.retrieval.postprocess.evaluate_postprocessed`, :class:`~cgd_heads.retrieval.whitening.Whitening`,
the query-expansion and re-ranking functions); it re-implements none of the methods.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

RESULTS = Path(__file__).resolve().parent / 'results'
SHARED = Path(os.environ.get('CGD_HEADS_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))

#: --dataset -> (folder under the shared data, reader of cgd_heads.data.load_splits, protocol)
DATASETS = {
    'cars196': ('cars196', 'cars196', 'CARS196 training half (../shared/data/cars196/README.md): classes 1-98 '
                                      'train, 99-196 test'),
    'omniglot': ('omniglot', 'omniglot', 'Omniglot (../shared/data/omniglot/README.md): images_background_small1 '
                                         'train (136 classes), images_background_small2 test (156 classes)'),
    'folder': (None, 'folder', 'image folder --data, the first --train-classes classes train, the rest test'),
}
#: hyper-parameter grids of the quality part (all chosen on the held-out training classes)
GRID: Dict[str, Tuple] = {
    'whiten_dim': (512, 256, 128), 'shrinkage': (0.25, 0.5, 1.0), 'qe': (1, 2, 5, 10), 'alpha': (0.0, 1.0, 3.0),
    'dba': (1, 2, 5), 'k1': (10, 20), 'k2': (3, 6), 'lambda': (0.1, 0.3),
}
#: --quick: the first two values of every list (a smoke run of every code path)
QUICK_GRID = {key: values[:2] for key, values in GRID.items()}
#: whitening kinds of the quality part -> their row names
WHITENING_ROWS = {'pca': 'PCA (no whitening)', 'pca-whiten': 'PCA-whitening', 'learned': 'learned whitening'}
#: the quality part reads R@1 and MAP@R only; K = 1 also keeps tiny smoke sets valid
KS = (1,)

#: cost part: the steps, in the table's order
STEPS = ('pca-whitening', 'learned-whitening', 'alpha-qe', 'dba', 'rerank-sparse', 'rerank-dense')
#: cost part: the settings each step runs with
COST_SETTINGS = {'whiten_dim': 256, 'qe': 5, 'dba': 5, 'alpha': 3.0, 'rerank': (20, 6, 0.3), 'per_class': 20,
                 'noise': 2.0}
STEP_NAMES = {
    'pca-whitening': 'PCA-whitening fit + apply (d -> {whiten_dim}, shrinkage 1)',
    'learned-whitening': 'learned whitening fit + apply (d -> {whiten_dim})',
    'alpha-qe': 'alpha-QE query-vs-rest (n={qe}, alpha={alpha:g})',
    'dba': 'DBA (n={dba}, alpha={alpha:g})',
    'rerank-sparse': 'k-reciprocal re-ranking, sparse, query-vs-rest (k1, k2, lambda = {rerank})',
    'rerank-dense': 'k-reciprocal re-ranking, dense, query-vs-rest (k1, k2, lambda = {rerank})',
}
#: cost part: items of the warm-up run of a step before it is measured
WARMUP_ITEMS = 256
#: dense re-ranking holds about this many N x N float64 matrices at its peak (distances, their ranked copy, the
#: argsort, the weights, the (N, k2, N) gather of the local expansion = k2 matrices, the Jaccard and final
#: distances): the estimate checked against --dense-max-gb before a dense run is started
DENSE_MATRICES = 6 + COST_SETTINGS['rerank'][1]


# ----------------------------------------------------------------------------------------------------------- common

def machine() -> str:
    """CPU model, cores, library versions and thread count, for the results files."""
    import faiss
    import timm
    import torch
    from cgd_heads import __version__
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = f', GPU {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return (f'{cpu}, {os.cpu_count()} cores ({faiss.omp_get_max_threads()} faiss threads){gpu}; cgd_heads '
            f'{__version__}, numpy {np.__version__}, faiss {faiss.__version__}, torch {torch.__version__}, '
            f'timm {timm.__version__}, Python {platform.python_version()}')


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (``VmHWM``, which ``exec`` resets, unlike ``ru_maxrss``), MB."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0, ``/proc/self/clear_refs``); False if refused.

    Memory freed earlier but still held by the C allocator is returned first (glibc ``malloc_trim``), so that a
    step cannot reuse it unseen.
    """
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def write_results(md_path: Path, lines: List[str], payload: Dict[str, Any]) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    md_path.with_suffix('.json').write_text(json.dumps(payload, indent=2) + '\n', encoding='utf-8')
    print(f'wrote {md_path} and {md_path.with_suffix(".json").name}')


# ---------------------------------------------------------------------------------------------------------- quality

def quality_splits(args: argparse.Namespace):
    """``(train ImageList, test ImageList, protocol text)`` of --dataset (the shared data unless --data)."""
    from cgd_heads.data import load_splits
    folder, reader, protocol = DATASETS[args.dataset]
    root = Path(args.data) if args.data else SHARED / folder
    if not root.exists():
        sys.exit(f'postprocess: {root} not found (set CGD_HEADS_DATA to the shared data folder, or pass --data)')
    kwargs = {'train_classes': args.train_classes} if args.dataset == 'folder' else {}
    splits = load_splits(reader, root, **kwargs)
    if 'train' not in splits or 'test' not in splits:
        sys.exit(f'postprocess: {root} gives the splits {sorted(splits)}, not train and test')
    return splits['train'], splits['test'], protocol


def cached_embeddings(args: argparse.Namespace, model, data_config: Dict[str, Any],
                      image_list) -> Tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of ``image_list``, computed once per checkpoint weights + data config + images."""
    from cgd_heads.cli.common import embed_split
    from cgd_heads.data import cache_root
    from cgd_heads.models.checkpoint import WEIGHTS_NAME
    from cgd_heads.retrieval.extract import load_embeddings, save_embeddings
    from cgd_heads.retrieval.index_file import sha256
    from cgd_heads.training.feature_cache import feature_cache_key
    from cgd_heads.utils.atomic import resolve_dir
    description = {'kind': 'postprocess benchmark embeddings', 'model': model.config, 'data': data_config,
                   'weights_sha256': sha256(resolve_dir(args.checkpoint) / WEIGHTS_NAME)}
    folder = Path(args.cache_dir) if args.cache_dir else cache_root() / 'postprocess_embeddings'
    path = folder / f'{feature_cache_key(description, image_list)}.safetensors'
    if path.is_file():
        emb, labels, _, _ = load_embeddings(path)
        if labels is not None and len(emb) == len(image_list):
            print(f'embeddings of {len(emb)} images from the cache {path}', flush=True)
            return emb.numpy(), labels.numpy()
    start = time.time()
    emb, labels = embed_split(model, image_list, data_config, device=args.device, amp='auto',
                              batch_size=args.batch_size, num_workers=args.num_workers)
    folder.mkdir(parents=True, exist_ok=True)
    save_embeddings(path, emb, labels, image_list.paths, {'description': description})
    print(f'embedded {len(emb)} images in {time.time() - start:.0f} s -> {path}', flush=True)
    return emb.numpy(), labels.numpy()


def validation_classes(args: argparse.Namespace) -> None:
    """Fill ``args.val_classes`` / ``args.seed`` left unset from the checkpoint's run (``RUN/train_config.json``
    beside ``RUN/best``): the same count and seed draw the same classes as training's validation split, classes the
    model never trained on. Without that file: 0.2 and seed 0 (the held-out classes may then include classes the
    model was trained on, which flatters validation but never touches the test classes)."""
    config_path = Path(args.checkpoint).resolve().parent / 'train_config.json'
    run = json.loads(config_path.read_text()) if config_path.is_file() else {}
    from_run = bool(run.get('val_classes')) and args.val_classes is None and args.seed in (None, run.get('seed'))
    if from_run:
        args.val_classes, args.seed = run['val_classes'], run.get('seed', 0)
        args.val_source = f"the model's own validation classes (read from {config_path.name} of the run)"
    else:
        given = args.val_classes is not None or args.seed is not None
        args.val_classes = 0.2 if args.val_classes is None else args.val_classes
        args.seed = 0 if args.seed is None else args.seed
        args.val_source = 'as given on the command line' if given else \
            f'no validation split in {config_path.name} beside the checkpoint: may include classes it trained on'


def held_out_mask(train_list, labels: np.ndarray, held_out: Union[int, float], seed: int) -> np.ndarray:
    """True for the training images of the held-out classes (drawn by ``ImageList.split_classes``)."""
    _, held = train_list.split_classes(held_out, seed=seed)
    names = np.asarray(train_list.class_names, dtype=object)
    return np.isin(names[labels], np.asarray(held.class_names, dtype=object))


Spec = Tuple[str, int, float]  # whitening (kind, dim, shrinkage): kind 'pca' (rotation), 'pca-whiten', 'learned'
Config = Dict[str, Any]        # PostProcess fields, the whitening as a Spec


def fit_whitening(spec: Spec, emb: np.ndarray, labels: np.ndarray):
    from cgd_heads.retrieval.whitening import Whitening
    kind, dim, shrinkage = spec
    if kind == 'learned':
        return Whitening.fit_learned(emb, labels, dim, shrinkage=shrinkage)
    return Whitening.fit_pca(emb, dim, whiten=kind == 'pca-whiten', shrinkage=shrinkage if shrinkage else 1.0)


def describe(config: Config) -> str:
    """The hyper-parameters of a row, in words."""
    parts = []
    if config.get('whitening'):
        kind, dim, shrinkage = config['whitening']
        parts.append({'pca': f'PCA d={dim}', 'pca-whiten': f'PCA-whitening d={dim}, shrinkage {shrinkage:g}',
                      'learned': f'learned whitening d={dim}, shrinkage {shrinkage:g}'}[kind])
    alpha = config.get('qe_alpha', 0.0)
    if config.get('dba', 0) > 1:
        parts.append(f'DBA n={config["dba"]}, alpha={alpha:g}')
    elif 'dba' in config:
        parts.append('DBA n=1 (off)')
    if config.get('qe'):
        parts.append(f'alpha-QE n={config["qe"]}, alpha={alpha:g}')
    if config.get('rerank'):
        parts.append('re-ranking k1={}, k2={}, lambda={:g}'.format(*config['rerank']))
    return '; '.join(parts) or '-'


class Evaluator:
    """Scores configurations on the validation classes and the test classes, fitting each whitening once."""

    def __init__(self, fit: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray],
                 test: Tuple[np.ndarray, np.ndarray]):
        self.sets = {'fit': fit, 'val': val, 'test': test}
        self.whitenings: Dict[Tuple[Spec, str], Any] = {}
        self.val_scores: Dict[str, Dict[str, float]] = {}
        self.evaluated = 0

    def whitening(self, spec: Optional[Spec], fitted_on: str = 'fit'):
        if spec is None:
            return None
        if (spec, fitted_on) not in self.whitenings:
            self.whitenings[spec, fitted_on] = fit_whitening(spec, *self.sets[fitted_on])
        return self.whitenings[spec, fitted_on]

    def metrics(self, config: Config, split: str, fitted_on: str = 'fit', nmi: bool = False) -> Dict[str, float]:
        from cgd_heads.retrieval.postprocess import PostProcess, evaluate_postprocessed
        fields = {k: v for k, v in config.items() if k != 'whitening'}
        postprocess = PostProcess(self.whitening(config.get('whitening'), fitted_on), **fields)
        emb, labels = self.sets[split]
        self.evaluated += 1
        result = evaluate_postprocessed(emb, labels, postprocess, ks=KS, nmi=nmi)
        return {k: result[k] for k in ('recall@1', 'map@r', 'nmi') if k in result}

    def choose(self, candidates: Sequence[Config]) -> Tuple[Config, Dict[str, float]]:
        """The candidate of highest validation R@1 (ties: MAP@R; then the first listed)."""
        best, best_score = None, None
        for config in candidates:
            key = json.dumps(config, sort_keys=True)
            if key not in self.val_scores:
                self.val_scores[key] = self.metrics(config, 'val')
            score = self.val_scores[key]
            if best is None or (score['recall@1'], score['map@r']) > (best_score['recall@1'], best_score['map@r']):
                best, best_score = config, score
        return best, best_score


def search_spaces(grid: Dict[str, Tuple], input_dim: int) -> Dict[str, List[Config]]:
    """The candidate lists: whitenings by kind, and the QE / DBA / re-ranking grids (without whitening)."""
    dims = [d for d in grid['whiten_dim'] if d <= input_dim] or [input_dim]
    dba = [{'dba': 1}] + [{'dba': n, 'qe_alpha': a} for n in grid['dba'] if n > 1 for a in grid['alpha']]
    dba_qe = [{'dba': d, 'qe': q, 'qe_alpha': a} for d in grid['dba'] for q in grid['qe'] for a in grid['alpha']]
    return {
        'dims': dims,
        'pca': [{'whitening': ('pca', d, 0.0)} for d in dims],
        'pca-whiten': [{'whitening': ('pca-whiten', d, s)} for d in dims for s in grid['shrinkage']],
        'learned': [{'whitening': ('learned', d, s)} for d in dims for s in grid['shrinkage']],
        'qe': [{'qe': n, 'qe_alpha': a} for n in grid['qe'] for a in grid['alpha']],
        'dba': dba,
        'dba_qe': dba_qe,
        'rerank': [{'rerank': (k1, k2, lam)} for k1 in grid['k1'] for k2 in grid['k2'] for lam in grid['lambda']],
    }


def with_base(base: Config, candidates: Sequence[Config]) -> List[Config]:
    return [dict(base, **c) for c in candidates]


def choose_rows(ev: Evaluator, space: Dict[str, List[Config]]) -> List[Tuple[str, Config, Dict[str, float], str]]:
    """``(row, chosen config, its validation scores, whitening fitted on)`` for every row of the table."""
    rows = [('none', {}, ev.choose([{}])[1], 'fit')]
    for kind, name in WHITENING_ROWS.items():
        for dim in space['dims']:  # one row per output dim; the whitenings' shrinkage chosen per dim
            candidates = [c for c in space[kind] if c['whitening'][1] == dim]
            rows.append((f'{name} d={dim}', *ev.choose(candidates), 'fit'))
    rows.append(('alpha-QE', *ev.choose(space['qe']), 'fit'))
    rows.append(('DBA (transductive)', *ev.choose(space['dba']), 'fit'))
    rows.append(('k-reciprocal re-ranking (transductive)', *ev.choose(space['rerank']), 'fit'))
    best_w, _ = ev.choose(space['pca'] + space['pca-whiten'] + space['learned'])
    rows.append(('best whitening + alpha-QE', *ev.choose(with_base(best_w, space['qe'])), 'fit'))
    rows.append(('best whitening + DBA (transductive)', *ev.choose(with_base(best_w, space['dba'])), 'fit'))
    rows.append(('best whitening + re-ranking (transductive)', *ev.choose(with_base(best_w, space['rerank'])),
                 'fit'))
    # greedy: DBA and QE chosen jointly (they share alpha) after the best whitening, then re-ranking on top
    expanded, _ = ev.choose(with_base(best_w, space['dba_qe']))
    rows.append(('all: best whitening + DBA + alpha-QE + re-ranking (transductive)',
                 *ev.choose(with_base(expanded, space['rerank'])), 'fit'))
    rows.append(('control: best whitening learned on the held-out classes', best_w, {}, 'val'))
    rows.append(('control: best whitening learned on all training classes', best_w, {}, 'train'))
    return rows


def quality(args: argparse.Namespace, argv: List[str]) -> None:
    from cgd_heads.cli.common import load_checkpoint
    start = time.time()
    train_list, test_list, protocol = quality_splits(args)
    model, data_config = load_checkpoint(args.checkpoint, args.img_size)
    train = cached_embeddings(args, model, data_config, train_list)
    test = cached_embeddings(args, model, data_config, test_list)
    held = held_out_mask(train_list, train[1], args.val_classes, args.seed)
    ev = Evaluator((train[0][~held], train[1][~held]), (train[0][held], train[1][held]), test)
    ev.sets['train'] = train
    grid = QUICK_GRID if args.quick else GRID
    space = search_spaces(grid, train[0].shape[1])
    chosen = choose_rows(ev, space)
    print(f'{ev.evaluated} validation evaluations in {time.time() - start:.0f} s; scoring the test split',
          flush=True)
    none = ev.metrics({}, 'test', nmi=True)
    rows = []
    for label, config, val, fitted_on in chosen:
        test_metrics = none if label == 'none' else ev.metrics(config, 'test', fitted_on)
        rows.append({'row': label, 'hyper_parameters': describe(config), 'config': config, 'whitening_fitted_on':
                     fitted_on, 'val': val, 'test': {k: test_metrics[k] for k in ('recall@1', 'map@r')},
                     'delta': {k: test_metrics[k] - none[k] for k in ('recall@1', 'map@r')}})
        print(f'{label:70s} test R@1 {100 * test_metrics["recall@1"]:.2f} MAP@R {100 * test_metrics["map@r"]:.2f}',
              flush=True)
    counts = {'train_images': int(len(train[1])), 'train_classes': train_list.num_classes,
              'held_out_images': int(held.sum()), 'held_out_classes': int(len(np.unique(train[1][held]))),
              'fit_images': int((~held).sum()), 'fit_classes': int(len(np.unique(train[1][~held]))),
              'test_images': int(len(test[1])), 'test_classes': int(len(np.unique(test[1]))),
              'embedding_dim': int(train[0].shape[1])}
    write_quality(args, argv, protocol, counts, grid, space['dims'], rows, none['nmi'], time.time() - start)


def pct(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return '-'
    return f'{100 * value:+.2f}' if signed else f'{100 * value:.2f}'


def write_quality(args, argv, protocol: str, counts: Dict[str, int], grid: Dict[str, Tuple], dims: List[int],
                  rows: List[Dict[str, Any]], nmi: float, seconds: float) -> None:
    c = counts
    lines = [
        f'# Retrieval post-processing on {args.dataset}: whitening, query expansion and re-ranking', '',
        f'- Checkpoint: `{args.checkpoint}` ({c["embedding_dim"]}-d embeddings). Data: {protocol}'
        + ('; SMOKE RUN (--quick: reduced grid)' if args.quick else '') + '.',
        f'- Test: {c["test_images"]} images of {c["test_classes"]} classes, every one a query against all the other '
        f'test images (query-vs-rest); R@1 and MAP@R in %. NMI of the raw test embeddings (faiss k-means, k = '
        f'classes, seed 0): **{pct(nmi)}**.',
        f'- Validation: {c["held_out_classes"]} of the {c["train_classes"]} TRAINING classes ({c["held_out_images"]} '
        f'images; --val-classes {args.val_classes}, seed {args.seed}, {args.val_source}; drawn by '
        f'`ImageList.split_classes`), query-vs-rest '
        f'among them. Every hyper-parameter is the one with the best validation R@1 (ties: MAP@R); whitenings are '
        f'learned on the other {c["fit_classes"]} training classes ({c["fit_images"]} images). The test split '
        'chooses nothing.',
        f'- Grids: whitening d in {dims} (<= the input dim; one row per kind and d), shrinkage (power on the '
        f'eigenvalues) of PCA-whitening and learned whitening in {list(grid["shrinkage"])}; '
        f'alpha-QE n in {list(grid["qe"])}, alpha in {list(grid["alpha"])}; DBA n in {list(grid["dba"])} (n = 1 is '
        f'off; alpha as QE\'s, shared when both run); re-ranking k1 in {list(grid["k1"])}, k2 in {list(grid["k2"])}, '
        f'lambda in {list(grid["lambda"])}. "best whitening" is the best of all whitening candidates; the '
        'combination rows choose their other steps after it; "all" picks DBA and QE jointly, then re-ranking '
        '(greedy).',
        '- **Transductive rows: DBA and k-reciprocal re-ranking use the test gallery itself** (DBA rewrites every '
        'test embedding from its nearest test embeddings; re-ranking uses the neighbour graph of all test images). '
        'alpha-QE expands each query with its nearest test images, as any query expansion does with its database. '
        'Whitenings are learned on training classes only (inductive).',
        '- Control rows: the best whitening\'s settings learned on the held-out validation classes instead (the '
        'classes it was chosen on), and on all training classes.',
        f'- Command: `python benchmarks/postprocess.py {" ".join(argv)}`',
        f'- Machine: {machine()}; wall time {seconds / 60:.1f} min (embedding included unless cached).', '',
        '| row | hyper-parameters (chosen on validation) | val R@1 | val MAP@R | test R@1 | test MAP@R '
        '| Δ R@1 | Δ MAP@R |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        lines.append(f'| {r["row"]} | {r["hyper_parameters"]} | {pct(r["val"].get("recall@1"))} | '
                     f'{pct(r["val"].get("map@r"))} | {pct(r["test"]["recall@1"])} | {pct(r["test"]["map@r"])} | '
                     f'{pct(r["delta"]["recall@1"], True)} | {pct(r["delta"]["map@r"], True)} |')
    lines += ['', 'Δ: test points vs the `none` row (plain inner-product search of the raw embeddings).', '',
              '## What each step gains or loses vs none (test)', '']
    for r in rows[1:]:
        d = r['delta']
        verb = 'gains' if d['recall@1'] > 0 else 'loses' if d['recall@1'] < 0 else 'leaves unchanged'
        lines.append(f'- {r["row"]} ({r["hyper_parameters"]}): {verb} R@1 ({pct(d["recall@1"], True)} points), '
                     f'MAP@R {pct(d["map@r"], True)} points.')
    payload = {'part': 'quality', 'dataset': args.dataset, 'checkpoint': str(args.checkpoint), 'quick': args.quick,
               'command': f'python benchmarks/postprocess.py {" ".join(argv)}', 'machine': machine(),
               'wall_seconds': seconds, 'counts': counts, 'grid': {k: list(v) for k, v in grid.items()},
               'whiten_dims': dims, 'nmi_raw_test': nmi, 'transductive_rows': [r['row'] for r in rows
                                                                              if 'transductive' in r['row']],
               'rows': rows}
    write_results(Path(args.output), lines, payload)


# ------------------------------------------------------------------------------------------------------------- cost

def synthetic_embeddings(n: int, d: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors: a random class centre (``n / per_class`` classes, uniform labels) plus Gaussian noise,
    built in blocks so that generating them adds little to the data's own footprint."""
    rng = np.random.default_rng(seed)
    classes = max(2, n // COST_SETTINGS['per_class'])
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 4096):
        block = centres[labels[start:start + 4096]]
        block += COST_SETTINGS['noise'] * rng.standard_normal(block.shape, dtype=np.float32)
        x[start:start + 4096] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels


def run_step(step: str, x: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Run one step on ``x`` (query-vs-rest where it applies); seconds of each of its parts."""
    from cgd_heads.retrieval.query_expansion import database_augmentation, query_expansion
    from cgd_heads.retrieval.rerank import k_reciprocal_rerank_dense, k_reciprocal_rerank_sparse
    from cgd_heads.retrieval.whitening import Whitening
    s = COST_SETTINGS
    parts: Dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        parts[name] = time.perf_counter() - start
        return out

    dim = min(s['whiten_dim'], x.shape[1])
    if step == 'pca-whitening':
        whitening = timed('fit', lambda: Whitening.fit_pca(x, dim, whiten=True, shrinkage=1.0))
        timed('apply', lambda: whitening.apply(x))
    elif step == 'learned-whitening':
        whitening = timed('fit', lambda: Whitening.fit_learned(x, labels, dim))
        timed('apply', lambda: whitening.apply(x))
    elif step == 'alpha-qe':
        timed('expand', lambda: query_expansion(x, x, s['qe'], s['alpha'], query_vs_rest=True))
    elif step == 'dba':
        timed('augment', lambda: database_augmentation(x, s['dba'], s['alpha']))
    elif step == 'rerank-sparse':
        # what MAP@R reads, the largest R (at least 8), but never more than the N - 1 others a query ranks
        top = int(min(max(8, np.bincount(labels).max() - 1), len(x) - 1))
        timed('rerank', lambda: k_reciprocal_rerank_sparse(x, x, *s['rerank'], top=top, query_vs_rest=True))
    elif step == 'rerank-dense':
        timed('rerank', lambda: k_reciprocal_rerank_dense(x, x, *s['rerank'], query_vs_rest=True))
    else:
        raise ValueError(f'unknown step {step!r}')
    return parts


def cost_worker(step: str, n: int, d: int) -> None:
    """Runs in a fresh subprocess: the data, then one step; prints seconds and memory as one JSON line."""
    # warm-up on 256 items: the first LAPACK / BLAS / faiss call of a process starts thread pools and loads
    # kernels (several seconds for the first eigh under load), a one-time cost the step's timing should not carry
    run_step(step, *synthetic_embeddings(WARMUP_ITEMS, d, seed=1))
    x, labels = synthetic_embeddings(n, d)
    reset = reset_peak_rss()  # the warm-up's and the generation's peaks are not the step's
    base = peak_rss_mb()
    parts = run_step(step, x, labels)
    peak = peak_rss_mb()
    print(json.dumps({'seconds': sum(parts.values()), 'parts': parts, 'data_mb': (x.nbytes + labels.nbytes) / 2 ** 20,
                      'base_mb': base, 'peak_mb': peak, 'extra_peak_mb': peak - base, 'peak_reset': reset}))


def dense_estimate_gb(n: int) -> float:
    return DENSE_MATRICES * 8 * n * n / 1e9


def measure(step: str, n: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One measurement in a fresh subprocess (or the reason it was skipped or failed)."""
    row: Dict[str, Any] = {'n': n, 'd': args.dim, 'step': step}
    if step == 'rerank-dense':
        row['estimate_gb'] = dense_estimate_gb(n)
        if row['estimate_gb'] > args.dense_max_gb:
            row['skipped'] = (f'skipped: ~{DENSE_MATRICES} N x N float64 matrices = {row["estimate_gb"]:.1f} GB '
                              f'> --dense-max-gb {args.dense_max_gb:g}')
            return row
    command = [sys.executable, str(Path(__file__).resolve()), '--worker', step, '--sizes', str(n),
               '--dim', str(args.dim)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row['error'] = f'timeout > {args.timeout} s'
        return row
    if proc.returncode != 0:
        row['error'] = (proc.stderr.strip().splitlines() or [f'exit status {proc.returncode}'])[-1][:160]
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return row


def cost(args: argparse.Namespace, argv: List[str]) -> None:
    start = time.time()
    plan = [(n, step) for n in args.sizes for step in STEPS]
    plan += [(n, step) for n in args.dense_sizes if n not in args.sizes for step in ('rerank-sparse', 'rerank-dense')]
    rows = []
    for n, step in sorted(plan, key=lambda item: item[0]):
        rows.append(measure(step, n, args))
        r = rows[-1]
        status = r.get('skipped') or r.get('error') or f'{r["seconds"]:.2f} s, +{r["extra_peak_mb"]:.0f} MB'
        print(f'n={n:>7} {step:18s} {status}', flush=True)
    write_cost(args, argv, rows, time.time() - start)


def write_cost(args: argparse.Namespace, argv: List[str], rows: List[Dict[str, Any]], seconds: float) -> None:
    s = COST_SETTINGS
    lines = [
        '# Retrieval post-processing: time and peak memory per step', '',
        f'- Data: synthetic clustered unit embeddings, d = {args.dim}: n / {s["per_class"]} random Gaussian class '
        f'centres, uniform labels (~{s["per_class"]} per class), each vector its centre plus {s["noise"]:g} x '
        'Gaussian noise, L2-normalised (float32).' + (' SMOKE RUN (--quick).' if args.quick else ''),
        '- Each measurement runs in a fresh subprocess: the libraries are imported, the step runs once on '
        f'{WARMUP_ITEMS} items (warm-up: thread pools, kernel loading), then the data is generated, freed memory is '
        'returned to the OS (`malloc_trim`) and the peak resident memory (VmHWM) is reset to the current resident '
        'size (`/proc/self/clear_refs`); time is the wall '
        'time of the step (perf_counter), "peak above data" is VmHWM after the step minus the resident size before '
        'it (interpreter, libraries and the data itself excluded).'
        + ('' if all(r.get('peak_reset', True) for r in rows) else ' THE RESET WAS REFUSED on this machine: the '
           'peaks are counted above the warm-up\'s peak instead and may be too low.'),
        f'- Steps: {"; ".join(STEP_NAMES[k].format(**s) for k in STEPS)}. Query-vs-rest: every item queries the '
        'others (the whole collection is both queries and database); sparse re-ranking returns lists of the '
        'largest class size - 1 (what MAP@R reads; at least 8, at most N - 1).',
        f'- Dense re-ranking is run only where its ~{DENSE_MATRICES} N x N float64 matrices (estimate: '
        f'{DENSE_MATRICES} x 8 N^2 bytes) fit in --dense-max-gb {args.dense_max_gb:g} GB; '
        f'dense-only sizes {list(args.dense_sizes)} compare it with the sparse version where it fits.',
        f'- Command: `python benchmarks/postprocess.py {" ".join(argv)}`',
        f'- Machine: {machine()}; wall time {seconds / 60:.1f} min.', '',
        '| n | step | time (s) | parts (s) | peak above data (MB) | data (MB) | note |',
        '|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        name = STEP_NAMES[r['step']].split(' (')[0]
        if 'seconds' in r:
            parts = ', '.join(f'{k} {v:.2f}' for k, v in r['parts'].items())
            note = f'estimate {r["estimate_gb"]:.2f} GB' if 'estimate_gb' in r else ''
            lines.append(f'| {r["n"]} | {name} | {r["seconds"]:.2f} | {parts} | {r["extra_peak_mb"]:.0f} | '
                         f'{r["data_mb"]:.0f} | {note} |')
        else:
            lines.append(f'| {r["n"]} | {name} | - | - | - | - | {r.get("skipped") or "FAILED: " + r["error"]} |')
    payload = {'part': 'cost', 'quick': args.quick, 'command': f'python benchmarks/postprocess.py {" ".join(argv)}',
               'machine': machine(), 'wall_seconds': seconds, 'settings': dict(s, dim=args.dim),
               'dense_matrices_estimate': DENSE_MATRICES, 'dense_max_gb': args.dense_max_gb, 'rows': rows}
    write_results(Path(args.output), lines, payload)


# ------------------------------------------------------------------------------------------------------------- main

def sizes(text: str) -> List[int]:
    """``'20000,60000'`` -> [20000, 60000]; ``'none'`` -> [] (e.g. ``--dense-sizes none``)."""
    if text.strip().lower() in ('', 'none'):
        return []
    try:
        values = [int(v) for v in text.split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated ints such as 20000,60000, got {text!r}') from None
    if any(v < 10 for v in values):  # smaller collections may draw a single class (learned whitening needs two)
        raise argparse.ArgumentTypeError(f'sizes must be ints >= 10, got {text!r}')
    return values


def build_parser() -> argparse.ArgumentParser:
    from cgd_heads.utils.settings import count_or_fraction
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--part', choices=('quality', 'cost'), help='what to measure (required unless --worker)')
    p.add_argument('--output', help='results .md (a .json is written beside it); default: '
                                    'benchmarks/results/postprocess_<dataset>.md (quality), postprocess.md (cost)')
    p.add_argument('--quick', action='store_true', help='smoke run (cost: tiny n; quality: the first two values of '
                                                        'every grid); needs an --output other than the default')
    q = p.add_argument_group('quality')
    q.add_argument('--checkpoint', help='checkpoint folder of a trained model, e.g. RUN/best')
    q.add_argument('--dataset', choices=sorted(DATASETS), help='cars196 / omniglot (the shared data), or folder')
    q.add_argument('--data', help='data root (default for cars196 / omniglot: $CGD_HEADS_DATA/<dataset>)')
    q.add_argument('--train-classes', type=count_or_fraction,
                   help='--dataset folder: the first N classes (or a fraction) train, the rest test')
    q.add_argument('--val-classes', type=count_or_fraction,
                   help='training classes held out for validation, a count or a fraction (default: the checkpoint '
                        "run's own --val-classes, read from RUN/train_config.json, so that the held-out classes are "
                        'ones the model never trained on; 0.2 when that file is absent)')
    q.add_argument('--seed', type=int, help="seed of the held-out class draw (default: the checkpoint run's, else 0)")
    q.add_argument('--img-size', type=int, help='image size (default: the size the checkpoint was trained at)')
    q.add_argument('--device', default='auto', help='device of the embedding pass (default %(default)s)')
    q.add_argument('--batch-size', type=int, default=128, help='batch size of the embedding pass (default %(default)s)')
    q.add_argument('--num-workers', type=int, default=2,
                   help='DataLoader workers of the embedding pass (default %(default)s)')
    q.add_argument('--cache-dir', help='embedding cache folder (default: $CGD_HEADS_CACHE/postprocess_embeddings)')
    c = p.add_argument_group('cost')
    c.add_argument('--sizes', type=sizes, help='collection sizes n, comma-separated (default 20000,60000,120000; '
                                               '--quick: 800)')
    c.add_argument('--dense-sizes', type=sizes, help='extra sizes where only re-ranking runs, dense next to '
                                                     'sparse (default 2000,5000; --quick: 200; none: no extra size)')
    c.add_argument('--dim', type=int, default=512, help='embedding dimension d (default %(default)s)')
    c.add_argument('--dense-max-gb', type=float, default=6.0,
                   help='skip dense re-ranking when its estimated N x N float64 matrices exceed this many GB '
                        '(default %(default)s)')
    c.add_argument('--timeout', type=int, default=3600,
                   help='seconds allowed per measurement subprocess (default %(default)s)')
    c.add_argument('--worker', choices=STEPS, help='internal: run one cost measurement in this process (n = the '
                                                   'single --sizes value) and print it as JSON')
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --part / --quick and refuse inconsistent options."""
    if args.part == 'quality':
        if not args.checkpoint or not args.dataset:
            p.error('--part quality needs --checkpoint RUN/best and --dataset')
        if args.dataset == 'folder' and (not args.data or args.train_classes is None):
            p.error('--dataset folder needs --data DIR and --train-classes N')
        validation_classes(args)
        if args.val_classes <= 0 or (isinstance(args.val_classes, float) and args.val_classes >= 1):
            p.error(f'--val-classes must be a count >= 1 or a fraction in (0, 1), got {args.val_classes}')
        default = RESULTS / f'postprocess_{args.dataset}.md'
    else:
        args.sizes = args.sizes if args.sizes is not None else ([800] if args.quick else [20000, 60000, 120000])
        args.dense_sizes = args.dense_sizes if args.dense_sizes is not None else \
            ([200] if args.quick else [2000, 5000])
        if args.dim < 2 or args.dense_max_gb <= 0 or args.timeout < 1:
            p.error('--dim must be >= 2, --dense-max-gb > 0 and --timeout >= 1')
        default = RESULTS / 'postprocess.md'
    args.output = args.output or str(default)
    if args.quick and Path(args.output).resolve() == default.resolve():
        p.error('--quick writes smoke numbers: pass an --output other than the committed results file')
    if Path(args.output).suffix != '.md':
        p.error(f'--output must name a .md file (the .json goes beside it), got {args.output}')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = build_parser()
    args = p.parse_args(argv)
    if args.worker:
        if not args.sizes or len(args.sizes) != 1:
            p.error('--worker needs exactly one --sizes value')
        cost_worker(args.worker, args.sizes[0], args.dim)
        return
    if not args.part:
        p.error('--part {quality,cost} is required')
    check_args(p, args)
    (quality if args.part == 'quality' else cost)(args, argv)


if __name__ == '__main__':
    main()
