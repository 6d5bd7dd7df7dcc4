"""Galleries of millions: building and searching indexes from embedding units, and extracting units from images with
one or two processes. Writes ``benchmarks/results/scale.md`` and ``scale.json``.

1. ``N`` synthetic clustered unit vectors (d = 512; ``N / 50`` Gaussian centres, unit-variance noise, as
   ``speed.py``'s index section) are generated chunk by chunk and written as units, never whole in memory; the
   queries are gallery vectors plus a noise vector of norm ``--query-noise`` (0.5: cosine ~0.9 to the vector it was
   made from, as a second photo of the same object), and the exact top 10 is found by streaming the units.
2. Each index is built from the units by ``build_index_from_units`` in a fresh subprocess, and searched in
   another fresh subprocess: build time, peak resident memory (``VmHWM``) of each, bytes per vector on disk,
   queries/s (all queries in one batch, median of 3) and recall@10 against the exact top 10. Indexes: flat shards
   (exact), HNSW shards, IVF-PQ with the lists in memory and IVF-PQ with on-disk lists.
3. Extraction images/s on real images (``$CGD_HEADS_DATA`` or ``../shared/data``: caltech101, else omniglot):
   ``extract_units`` under ``torchrun`` with 1 process x 2 threads and with 2 processes x 1 thread.

    python benchmarks/scale.py                         # N = 1,000,000: roughly 1-2 h on 2 CPU cores (estimate)
    python benchmarks/scale.py --quick                 # smoke run, seconds; writes into a temporary folder
    python benchmarks/scale.py --n 200000 --indexes ivfpq,ivfpq-disk --output /tmp/scale.md

Run it on an otherwise idle machine: OpenMP threads (faiss, torch) that wait for each other on busy cores slow down
by large factors.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / 'benchmarks' / 'results' / 'scale.md'
SHARED = Path(os.environ.get('CGD_HEADS_DATA', REPO.parent / 'shared' / 'data'))
INDEXES = ('flat', 'hnsw', 'ivfpq', 'ivfpq-disk')
#: search-time options measured after the default ones (same loaded index, one search of all queries each)
SWEEP = {'hnsw': [{'ef_search': e} for e in (16, 128, 256, 512)], 'ivfpq': [{'nprobe': n} for n in (4, 64, 256)],
         'ivfpq-disk': [{'nprobe': n} for n in (4, 64, 256)]}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``), MB."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


def index_settings(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """``build_index_from_units`` arguments of each index."""
    nlist = args.nlist or max(1, int(4 * np.sqrt(args.n)))
    ivf = dict(index_type='ivf', nlist=nlist, nprobe=min(nlist, 16), pq_m=64,
               train_size=min(args.n, args.train_size or 39 * nlist))
    return {
        'flat': dict(index_type='flat', shard_size=args.shard_size),
        'hnsw': dict(index_type='hnsw', shard_size=args.hnsw_shard_size, M=32, ef_construction=40, ef_search=64),
        'ivfpq': ivf,
        'ivfpq-disk': dict(ivf, on_disk=True, shard_size=args.shard_size),
    }


# ------------------------------------------------------------------------------------------------ synthetic units
def write_units(work: Path, n: int, dim: int, unit_size: int, queries: int, query_noise: float,
                seed: int = 0) -> np.ndarray:
    """Write ``n`` clustered unit vectors as units (one chunk in memory at a time); return the queries."""
    from cgd_heads import EmbeddingUnits
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    picked = np.sort(rng.choice(n, queries, replace=False))
    units = EmbeddingUnits.create(work / 'units', n, unit_size, f'synthetic:seed={seed}',
                                  f'synthetic:n={n},dim={dim}', preprocessing={'generator': 'clustered'})
    found = []
    for unit in range(units.num_units):
        start, stop = units.unit_range(unit)
        labels = rng.integers(0, len(centers), stop - start)
        x = centers[labels] + rng.standard_normal((stop - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        units.write_unit(unit, x, labels)
        found.append(x[picked[(picked >= start) & (picked < stop)] - start])
    # Gaussian noise of expected norm query_noise (per coordinate query_noise / sqrt(d)) on unit vectors
    q = np.concatenate(found) + query_noise / np.sqrt(dim) * rng.standard_normal((queries, dim), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def exact_top_k(work: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top ``k`` of every query, streaming the units (ties broken by the smaller id)."""
    from cgd_heads import EmbeddingUnits
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), k), -1, dtype=np.int64)
    for unit in EmbeddingUnits.open(work / 'units').iter_units():
        scores = queries @ unit.embeddings.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else \
            np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        ids = np.concatenate([best_ids, unit.ids[top]], axis=1)
        order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    return best_ids


# ---------------------------------------------------------------------------------------- subprocess measurements
def measure_build(work: Path, kind: str, settings: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in a fresh process: build the index from the units."""
    from cgd_heads import build_index_from_units
    out = work / f'index-{kind}'
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build_index_from_units(work / 'units', out, **settings)
    seconds = time.perf_counter() - start
    files = [p for p in out.rglob('*') if p.is_file() and p.suffix in ('.faiss', '.ivfdata')]
    return {'build_s': seconds, 'build_peak_mb': peak_rss_mb(), 'index_bytes': sum(p.stat().st_size for p in files)}


def measure_search(work: Path, kind: str, k: int) -> Dict[str, Any]:
    """Runs in a fresh process: load the index, search every query, recall@k against the exact top k."""
    from cgd_heads import ShardedIndex, load_index
    start = time.perf_counter()
    index = load_index(work / f'index-{kind}')
    load_s = time.perf_counter() - start
    queries, exact = np.load(work / 'queries.npy'), np.load(work / 'exact.npy')
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = index.search(queries, k)
        times.append(time.perf_counter() - start)
    recall = recalls(index, result, exact, k)
    sweep = []
    shards = index.shards if isinstance(index, ShardedIndex) else [index]
    nlist = shards[0].params.get('nlist')
    for params in SWEEP.get(kind, ()):  # the speed / recall trade-off of the search-time option
        if nlist is not None and params.get('nprobe', 0) > nlist:
            continue  # small (--quick) indexes have fewer lists
        for shard in shards:
            shard.set_search_params(**params)
        start = time.perf_counter()
        swept = index.search(queries, k)
        sweep.append(dict(params, qps=len(queries) / (time.perf_counter() - start), **recalls(index, swept, exact, k)))
    return {'load_s': load_s, 'qps': len(queries) / statistics.median(times), **recall, 'sweep': sweep,
            'search_peak_mb': peak_rss_mb(), 'count': len(index)}


def recalls(index: Any, result: Any, exact: np.ndarray, k: int) -> Dict[str, float]:
    """recall@k (overlap of the top k with the exact top k) and recall@1 (the exact nearest vector ranked first)."""
    from cgd_heads import ShardedIndex
    if isinstance(index, ShardedIndex):
        offsets = np.cumsum([0] + [len(s) for s in index.shards[:-1]])
        _, shard_ids, ids = result
        found = np.where(ids >= 0, offsets[shard_ids] + ids, -1)
    else:
        found = result[1]
    return {f'recall@{k}': float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact[:, :k])])),
            'recall@1': float(np.mean(found[:, 0] == exact[:, 0]))}


def baseline() -> Dict[str, Any]:
    """Runs in a fresh process: the imports alone (Python, numpy, torch, faiss, cgd_heads.retrieval)."""
    import cgd_heads.retrieval  # noqa: F401
    return {'peak_mb': peak_rss_mb()}


def in_subprocess(step: str, work: Path, kind: str = '', settings: Optional[Dict[str, Any]] = None,
                  k: int = 10, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """One measurement in a fresh Python process; its last stdout line is the JSON result."""
    cmd = [sys.executable, __file__, '--_step', step, '--work', str(work), '--_kind', kind, '--_k', str(k),
           '--_settings', json.dumps(settings or {})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if proc.returncode != 0:
        raise RuntimeError(f'{step} {kind} failed:\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- extraction
def extraction_images(limit: int):
    """The first real data set found under SHARED (caltech101, else omniglot), thinned to ``limit`` images across
    its classes, or None."""
    from cgd_heads.data import ImageList, load_splits
    for name in ('caltech101', 'omniglot'):
        if (SHARED / name).is_dir():
            splits = load_splits('auto', SHARED / name)
            images = splits.get('all') or splits.get('test') or splits['train']
            step = max(1, len(images) // limit)
            keep = list(range(0, len(images), step))[:limit]
            return name, ImageList([images.paths[i] for i in keep], [images.labels[i] for i in keep],
                                   images.class_names)
    return None


def extract_worker(work: Path, settings: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """Runs under torchrun: every rank embeds its share of the units; rank 0 returns the timing."""
    import torch
    from cgd_heads import create_model, extract_embeddings, extract_units
    from cgd_heads.data import ImageDataset, create_cgd_transform, data_config_of
    from cgd_heads.utils.distributed import init_distributed
    name, images = extraction_images(settings['images'])
    context = init_distributed('cpu')
    torch.manual_seed(0)  # the same random weights on every rank
    model = create_model(settings['model'], embed_dim=512).eval()
    dataset = ImageDataset(images, create_cgd_transform(data_config_of(model, settings['size']), False,
                                                        settings['size']))
    directory = work / f"extract-{settings['tag']}"
    warm = torch.utils.data.Subset(dataset, range(min(len(dataset), settings['batch_size'])))
    extract_embeddings(model, warm, batch_size=settings['batch_size'], device='cpu', progress=False)  # lazy inits
    context.barrier()
    start = time.perf_counter()
    extract_units(model, dataset, directory, images.paths, images.labels, fingerprint='benchmark',
                  unit_size=settings['unit_size'], batch_size=settings['batch_size'], device='cpu', context=context)
    seconds = time.perf_counter() - start
    if not context.is_main:
        return None
    return {'dataset': name, 'images': len(images), 'seconds': seconds, 'images_per_s': len(images) / seconds,
            'threads': torch.get_num_threads(), 'processes': context.world_size}


def measure_extraction(work: Path, settings: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Both configurations, each a torchrun of :func:`extract_worker`, the image files read once beforehand so
    neither pays for a cold disk cache."""
    for path in extraction_images(settings['images'])[1].paths:
        Path(path).read_bytes()
    rows = []
    for processes, threads in ((1, 2), (2, 1)):
        tag = f'{processes}x{threads}'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}',
               __file__, '--_step', 'extract', '--work', str(work), '--_settings', json.dumps(dict(settings, tag=tag))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if proc.returncode != 0:
            raise RuntimeError(f'extraction {tag} failed:\n{proc.stderr[-3000:]}')
        row = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{')][-1])
        rows.append(dict(row, wall_s=time.perf_counter() - start, config=f'{processes} process(es) x {threads} '
                                                                          f'thread(s)'))
        print('extraction', rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------ report
def machine() -> str:
    import faiss
    import torch
    cpu = platform.processor() or platform.machine()
    return (f'{cpu}, {os.cpu_count()} cores; numpy {np.__version__}, faiss {faiss.__version__}, torch '
            f'{torch.__version__}, Python {platform.python_version()}')


def write_report(path: Path, payload: Dict[str, Any]) -> None:
    a = payload['args']
    lines = ['# Galleries of millions', '', f"- Machine: {payload['machine']}.",
             f"- Command: `{payload['command']}`; wall time {payload['wall_s'] / 60:.1f} min.",
             f"- Gallery: {a['n']:,} synthetic clustered unit vectors, d = {a['dim']} ({a['n'] // 50:,} centres, "
             f"unit-variance noise), written as units of {a['unit_size']:,}; {a['queries']:,} queries (gallery "
             f"vectors + noise of norm {a['query_noise']:g}, cosine ~{1 / np.sqrt(1 + a['query_noise'] ** 2):.2f} to "
             f"their source), k = 10: recall@10 is the overlap with the exact top 10, recall@1 the share of "
             f"queries whose exact nearest vector (the gallery vector the query was made from) is ranked first. In "
             f"512-d with unit-variance noise the ~50 members of a cluster are almost equidistant from a query, so "
             f"the exact ranks 2-10 are near-ties that approximate search rarely reproduces: recall@10 is a harsh "
             f"measure on these data, recall@1 the one a retrieval user feels.",
             f"- Peak memory: `VmHWM` of a fresh process for the build and another for the search; a process that "
             f"only imports numpy, torch, faiss and cgd_heads.retrieval peaks at {payload['baseline_mb']:.0f} MB "
             f"(in parentheses: the peak above it). Bytes per vector: the faiss files (and the lists file) on disk "
             f"/ N. The on-disk lists are memory-mapped: their pages count as resident once touched, but are page "
             f"cache the system can evict.",
             '- Run on an otherwise idle machine: with other processes on the cores, OpenMP threads that wait for '
             'each other (faiss k-means, torch with 2 threads) slow down by large factors, and the comparisons '
             'below mean nothing.',
             '' if not a['quick'] else '- **SMOKE RUN (--quick)**: sizes too small to compare indexes.', '',
             '## Indexes built from units', '',
             '| index | settings | build (s) | build peak (MB) | bytes / vector | load (s) | search peak (MB) '
             '| queries/s | recall@10 | recall@1 |', '|---|---|---|---|---|---|---|---|---|---|']
    base = payload['baseline_mb']
    for kind, r in payload['indexes'].items():
        settings = ', '.join(f'{k}={v}' for k, v in r['settings'].items())
        lines.append(f"| {kind} | {settings} | {r['build_s']:.1f} | {r['build_peak_mb']:.0f} "
                     f"(+{r['build_peak_mb'] - base:.0f}) | {r['index_bytes'] / a['n']:.0f} | {r['load_s']:.2f} | "
                     f"{r['search_peak_mb']:.0f} (+{r['search_peak_mb'] - base:.0f}) | {r['qps']:.0f} | "
                     f"{r['recall@10']:.3f} | {r.get('recall@1', float('nan')):.3f} |")
    swept = [(kind, s) for kind, r in payload['indexes'].items() for s in r.get('sweep', [])]
    if swept:
        lines += ['', 'Search-time options on the same loaded index (one search of all queries each):', '',
                  '| index | option | queries/s | recall@10 | recall@1 |', '|---|---|---|---|---|']
        lines += [f"| {kind} | {', '.join(f'{k}={v}' for k, v in s.items() if not k.startswith(('qps', 'recall')))} "
                  f"| {s['qps']:.0f} | {s['recall@10']:.3f} | {s['recall@1']:.3f} |" for kind, s in swept]
    lines += ['', '## Extraction into units', '']
    if payload['extraction']:
        e = payload['extraction'][0]
        lines += [f"{e['images']} images of {e['dataset']}, `{a['extract_model']}` (random weights) at "
                  f"{a['extract_size']} px, batch {a['extract_batch']}, units of {a['extract_unit_size']}, no "
                  'loader workers (decoding on the computing threads); seconds from the first rank leaving the start '
                  'barrier to the end barrier (wall: the whole torchrun, start-up included).', '',
                  '| configuration | images/s | seconds | wall (s) |', '|---|---|---|---|']
        lines += [f"| {e['config']} | {e['images_per_s']:.1f} | {e['seconds']:.1f} | {e['wall_s']:.1f} |"
                  for e in payload['extraction']]
    else:
        lines.append(f'Skipped: no caltech101 or omniglot under {SHARED} (set CGD_HEADS_DATA).')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    path.with_suffix('.json').write_text(json.dumps(payload, indent=2) + '\n', encoding='utf-8')
    print(f'wrote {path} and {path.with_suffix(".json").name}')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes (a smoke run); output in a temporary folder')
    p.add_argument('--n', type=int, default=1_000_000, help='gallery vectors')
    p.add_argument('--dim', type=int, default=512)
    p.add_argument('--unit-size', type=int, default=50_000)
    p.add_argument('--queries', type=int, default=1000)
    p.add_argument('--query-noise', type=float, default=0.5,
                   help='norm of the Gaussian noise added to the gallery vectors the queries are made from')
    p.add_argument('--indexes', default=','.join(INDEXES), help=f'comma-separated subset of {INDEXES}')
    p.add_argument('--nlist', type=int, help='IVF lists (default 4 sqrt(N))')
    p.add_argument('--train-size', type=int, help='IVF training sample (default 39 nlist)')
    p.add_argument('--shard-size', type=int, default=250_000, help='flat shards / on-disk parts')
    p.add_argument('--hnsw-shard-size', type=int, default=1_000_000)
    p.add_argument('--extract-images', type=int, default=512)
    p.add_argument('--extract-model', default='resnet18')
    p.add_argument('--extract-size', type=int, default=224)
    p.add_argument('--extract-batch', type=int, default=32)
    p.add_argument('--extract-unit-size', type=int, default=64)
    p.add_argument('--no-extraction', action='store_true')
    p.add_argument('--work', help='scratch folder (default: a temporary one, deleted at the end)')
    p.add_argument('--output', help=f'report path (default {RESULTS.relative_to(REPO)})')
    for hidden in ('--_step', '--_kind', '--_settings', '--_k'):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.unit_size, args.queries, args.shard_size, args.hnsw_shard_size = 2000, 500, 50, 800, 1500
        args.nlist, args.train_size = args.nlist or 16, args.train_size or 1000
        args.extract_images, args.extract_model, args.extract_size = 24, 'test_efficientnet', 32
        args.extract_batch, args.extract_unit_size = 4, 4
    return args


def run_steps(args: argparse.Namespace) -> None:
    """The hidden entry points of the subprocesses: print one JSON line."""
    work, settings = Path(args.work), json.loads(args._settings or '{}')
    if args._step == 'build':
        result = measure_build(work, args._kind, settings)
    elif args._step == 'search':
        result = measure_search(work, args._kind, int(args._k))
    elif args._step == 'extract':
        result = extract_worker(work, settings)
    else:
        result = baseline()
    if result is not None:
        print(json.dumps(result), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args._step:
        return run_steps(args)
    started = time.perf_counter()
    output = Path(args.output) if args.output else (
        Path(tempfile.mkdtemp(prefix='scale_quick_')) / 'scale.md' if args.quick else RESULTS)
    work = Path(args.work or tempfile.mkdtemp(prefix='scale_work_'))
    work.mkdir(parents=True, exist_ok=True)
    try:
        queries = write_units(work, args.n, args.dim, args.unit_size, args.queries, args.query_noise)
        np.save(work / 'queries.npy', queries)
        np.save(work / 'exact.npy', exact_top_k(work, queries, 10))
        print(f'{args.n:,} vectors in units, exact top 10 of {args.queries} queries: '
              f'{time.perf_counter() - started:.0f} s', flush=True)
        indexes = {}
        for kind in [k for k in args.indexes.split(',') if k]:
            settings = index_settings(args)[kind]
            indexes[kind] = dict(settings=settings, **in_subprocess('build', work, kind, settings),
                                 **in_subprocess('search', work, kind))
            print(kind, indexes[kind], flush=True)
            shutil.rmtree(work / f'index-{kind}', ignore_errors=True)
        extraction = [] if args.no_extraction or extraction_images(1) is None else measure_extraction(
            work, dict(images=args.extract_images, model=args.extract_model, size=args.extract_size,
                       batch_size=args.extract_batch, unit_size=args.extract_unit_size))
        command = ' '.join(['python', 'benchmarks/scale.py', *(argv if argv is not None else sys.argv[1:])])
        payload = {'machine': machine(), 'command': command,
                   'args': {k: v for k, v in vars(args).items() if not k.startswith('_')},
                   'baseline_mb': in_subprocess('baseline', work)['peak_mb'], 'indexes': indexes,
                   'extraction': extraction, 'wall_s': time.perf_counter() - started}
        write_report(output, payload)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
