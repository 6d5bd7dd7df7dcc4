"""What CGD costs: head overhead, pooling kernels, stride removal, evaluation, index search, training throughput.

Every comparison is measured side by side in one process (ratios, not just absolute times); evaluation runs each
measurement in a fresh subprocess so its peak memory (max RSS) is its own. Writes ``benchmarks/results/speed.md``.

    python benchmarks/speed.py                 # full run, ~30-45 min on 2 CPU cores
    python benchmarks/speed.py --quick         # smoke configuration, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from cgd_heads import CGDLoss, GeneralizedPooling, create_model

RESULTS = Path(__file__).resolve().parent / 'results' / 'speed.md'


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = f', GPU {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''
    return (f'{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), '
            f'timm {timm.__version__}{gpu}')


def sgemm_peak(size: int = 4096) -> float:
    """Measured float32 matmul throughput (FLOP/s) of this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / timed(lambda: a @ b, repeats=5)


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MB.

    ``VmHWM`` rather than ``getrusage``: Linux carries ``ru_maxrss`` over ``exec`` from the forked parent, so a worker
    started by a large parent would report the parent's peak.
    """
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024


class GapFC(nn.Module):
    """The plain baseline head: global average pooling + FC + L2 normalisation."""

    def __init__(self, in_features: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_features, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(x.mean((2, 3))), dim=1)


def head_overhead(name: str, size: int, batch: int, repeats: int) -> Dict[str, object]:
    """(backbone + CGDHead 'SMG') vs (backbone + GAP + FC), the same stripped backbone, forward and fwd+bwd."""
    model = create_model(name, descriptors='SMG', embed_dim=1536)
    backbone, cgd = model.backbone, model.head
    gap = GapFC(model.num_features, 1536)
    x = torch.randn(batch, 3, size, size)
    out: Dict[str, object] = {'model': name, 'size': size, 'batch': batch}
    for label, head in (('cgd', cgd), ('gap', gap)):
        with torch.no_grad():
            backbone.eval()
            out[f'{label}_fwd'] = timed(lambda: head(backbone.forward_features(x)), repeats)
        backbone.train()
        out[f'{label}_fwdbwd'] = timed(lambda: head(backbone.forward_features(x)).sum().backward(), repeats)
    out['ratio_fwd'] = out['cgd_fwd'] / out['gap_fwd']
    out['ratio_fwdbwd'] = out['cgd_fwdbwd'] / out['gap_fwdbwd']
    return out


def pooling_kernels(batch: int, repeats: int) -> List[Dict[str, object]]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.rand(batch, 2048, 14, 14).to(dtype)
        ref_avg = timed(lambda: F.adaptive_avg_pool2d(x, 1), repeats)
        ref_max = timed(lambda: F.adaptive_max_pool2d(x, 1), repeats)
        for label, pool, ref in (('p=1 (SPoC)', GeneralizedPooling(1.0), ref_avg),
                                 ('p=inf (MAC)', GeneralizedPooling(float('inf')), ref_max),
                                 ('p=3 (GeM)', GeneralizedPooling(3.0), ref_avg),
                                 ('p=3 learnable', GeneralizedPooling(3.0, learnable=True), ref_avg)):
            with torch.no_grad():
                t = timed(lambda: pool(x), repeats)
            rows.append({'dtype': str(dtype).replace('torch.', ''), 'pool': label, 'ms': 1e3 * t,
                         'torch_ms': 1e3 * ref, 'ratio': t / ref})
    return rows


def stride_cost(name: str, size: int, batch: int, repeats: int) -> Dict[str, object]:
    x = torch.randn(batch, 3, size, size)
    times = {}
    for mode in (None, 'strip', 'dilate'):
        backbone = create_model(name, stride_mode=mode, embed_dim=8).backbone.eval()
        with torch.no_grad():
            times[str(mode)] = timed(lambda: backbone.forward_features(x), repeats)
    return {'model': name, 'size': size, 'batch': batch, **times}


def training_throughput(name: str, size: int, batch: int, repeats: int) -> Dict[str, object]:
    """Images/s of a CGD training step vs a plain timm classifier step, same backbone and batch."""
    labels = torch.arange(batch // 4).repeat_interleave(4)
    x = torch.randn(batch, 3, size, size)
    cgd = create_model(name, descriptors='SG', embed_dim=1536, num_classes=100).train()
    criterion = CGDLoss(aux_loss=cgd.head.aux_head.loss)
    opt_a = torch.optim.Adam(cgd.parameters(), 1e-4)
    plain = timm.create_model(name, num_classes=100).train()
    opt_b = torch.optim.Adam(plain.parameters(), 1e-4)

    def cgd_step():
        emb, logits = cgd.forward_train(x)
        loss = criterion(emb, labels, logits)
        opt_a.zero_grad()
        loss.backward()
        opt_a.step()

    def plain_step():
        loss = F.cross_entropy(plain(x), labels)
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()

    a, b = timed(cgd_step, repeats), timed(plain_step, repeats)
    return {'model': name, 'size': size, 'batch': batch, 'cgd_img_s': batch / a, 'plain_img_s': batch / b,
            'ratio': b / a}


def _eval_worker(kind: str, n: int, d: int) -> None:
    """Runs in a subprocess: one evaluation, prints seconds and peak RSS as JSON."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n // 20, n)
    centers = rng.standard_normal((n // 20, d)).astype(np.float32)
    x = centers[labels] + 2.0 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    base_rss = peak_rss_mb()
    start = time.perf_counter()
    if kind == 'ours':
        from cgd_heads.metrics import evaluate_retrieval
        evaluate_retrieval(x, labels, ks=(1, 2, 4, 8))
    else:
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r'), k='max_bin_count',
                           device=torch.device('cpu')).get_accuracy(x, labels, x, labels, ref_includes_query=True)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({'seconds': seconds, 'peak_mb': peak, 'data_mb': x.nbytes / 2 ** 20,
                      'extra_peak_mb': peak - base_rss}))


def evaluation(sizes: List[int], dims: List[int], peak: float, timeout: int) -> List[Dict[str, object]]:
    rows = []
    for d in dims:
        for n in sizes:
            row: Dict[str, object] = {'n': n, 'd': d, 'bound_s': 2 * n * n * d / peak}
            for kind in ('ours', 'pml'):
                try:
                    proc = subprocess.run([sys.executable, __file__, '--eval-worker', kind, str(n), str(d)],
                                          capture_output=True, text=True, timeout=timeout)
                    row[kind] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                        {'error': proc.stderr.strip().splitlines()[-1][:120]}
                except subprocess.TimeoutExpired:
                    row[kind] = {'error': f'timeout > {timeout}s'}
            rows.append(row)
            print('eval', n, d, row, flush=True)
    return rows


def index_search(n: int, d: int, queries: int) -> List[Dict[str, object]]:
    from cgd_heads.index import RetrievalIndex
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((n // 50, d)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, queries, replace=False)] + 0.1 * rng.standard_normal((queries, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows, exact = [], None
    nlist, pq_m = min(1024, n // 100), 64 if d % 64 == 0 and d >= 512 else 8
    for label, kwargs in (('flat (exact)', {'index_type': 'flat'}),
                          ('hnsw M=32 ef=64', {'index_type': 'hnsw'}),
                          (f'ivf-pq nlist={nlist} m={pq_m} nprobe=16', {'index_type': 'ivf', 'nlist': nlist,
                                                                        'pq_m': pq_m})):
        start = time.perf_counter()
        index = RetrievalIndex.build(x, **kwargs)
        build = time.perf_counter() - start
        start = time.perf_counter()
        _, ids = index.search(q, k=10)
        search = time.perf_counter() - start
        exact = ids if exact is None else exact
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))
        # flat: the vector; HNSW: vector + 2M int32 links on level 0; IVF-PQ: m one-byte codes + the int64 id
        bytes_per_vector = {'flat': 4 * d, 'hnsw': 4 * d + 4 * 2 * 32}.get(kwargs['index_type'], pq_m + 8)
        rows.append({'index': label, 'build_s': build, 'qps': queries / search, 'recall@10': recall,
                     'bytes_per_vector': bytes_per_vector})
        print('index', rows[-1], flush=True)
    return rows


def write(path: Path, sections: Dict[str, object], seconds: float, command: str, peak: float) -> None:
    L = ['# Speed', '', f'- Machine: {machine()}.', f'- Measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s.',
         f'- Command: `{command}`; wall time {seconds / 60:.1f} min. Times are medians of repeated runs.', '']
    L += ['## Head overhead', '', 'Same stripped backbone, batch of random images; CGDHead `SMG` 1536-d vs global '
          'average pooling + FC 1536-d.', '',
          '| backbone | input | batch | fwd CGD (s) | fwd GAP+FC (s) | ratio | fwd+bwd CGD (s) | fwd+bwd GAP+FC (s) '
          '| ratio |',
          '|---|---|---|---|---|---|---|---|---|']
    for r in sections['head']:
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['cgd_fwd']:.3f} | {r['gap_fwd']:.3f} | "
                 f"{r['ratio_fwd']:.3f} | {r['cgd_fwdbwd']:.3f} | {r['gap_fwdbwd']:.3f} | {r['ratio_fwdbwd']:.3f} |")
    L += ['', '## Pooling kernels', '', 'Forward on a (batch, 2048, 14, 14) map; reference: torch adaptive avg pooling '
          '(for SPoC and GeM) or max pooling (for MAC).', '', '| dtype | pooling | ms | torch ms | ratio |',
          '|---|---|---|---|---|']
    for r in sections['pool']:
        L.append(f"| {r['dtype']} | {r['pool']} | {r['ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} |")
    L += ['', '## Stride removal cost', '', 'Backbone forward (no grad), the price of a 2x larger final map.', '',
          '| backbone | input | batch | untouched (s) | stripped (s) | dilated (s) | stripped / untouched |',
          '|---|---|---|---|---|---|---|']
    for r in sections['stride']:
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['None']:.3f} | {r['strip']:.3f} | "
                 f"{r['dilate']:.3f} | {r['strip'] / r['None']:.2f} |")
    L += ['', '## Training throughput', '', 'One optimisation step (Adam): CGD (SG, 1536-d, classifier, batch-hard '
          'triplet) vs timm classifier with cross-entropy, same backbone and batch.', '',
          '| backbone | input | batch | CGD img/s | classifier img/s | CGD / classifier |', '|---|---|---|---|---|---|']
    for r in sections['train']:
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['cgd_img_s']:.1f} | {r['plain_img_s']:.1f} | "
                 f"{r['ratio']:.2f} |")
    L += ['', '## Evaluation (Recall@1/2/4/8 + MAP@R, query vs rest)', '',
          'Clustered random unit embeddings (20 per class). `bound` = 2 n^2 d / measured matmul peak (the similarity '
          'matrix alone). Peak = peak RSS (VmHWM) of a fresh process that generated the data and evaluated it; `+eval` = '
          'how far evaluation raised that peak above the data generation; `data` = the embeddings themselves. PML = '
          "`AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r'), k='max_bin_count')`.", '',
          '| n | d | bound (s) | ours (s) | ours / bound | ours peak MB (+eval, data) | PML (s) | PML peak MB (+eval) '
          '| PML / ours |',
          '|---|---|---|---|---|---|---|---|---|']
    for r in sections['eval']:
        ours, pml = r['ours'], r['pml']
        if 'error' in ours:
            L.append(f"| {r['n']} | {r['d']} | {r['bound_s']:.1f} | {ours['error']} | | | | | |")
            continue
        pml_cells = (f"{pml['seconds']:.1f} | {pml['peak_mb']:.0f} (+{pml['extra_peak_mb']:.0f}) | "
                     f"{pml['seconds'] / ours['seconds']:.2f}"
                     if 'error' not in pml else f"{pml['error']} | | ")
        L.append(f"| {r['n']} | {r['d']} | {r['bound_s']:.1f} | {ours['seconds']:.1f} | "
                 f"{ours['seconds'] / r['bound_s']:.2f} | {ours['peak_mb']:.0f} (+{ours['extra_peak_mb']:.0f}, "
                 f"{ours['data_mb']:.0f}) | "
                 f"{pml_cells} |")
    L += ['', '## Index search', '', f"{sections['index_n']} clustered unit vectors of dim {sections['index_d']}, "
          f"{sections['index_q']} queries, k = 10; recall@10 against the exact flat index.", '',
          '| index | build (s) | queries/s | recall@10 | ~bytes/vector |', '|---|---|---|---|---|']
    for r in sections['index']:
        L.append(f"| {r['index']} | {r['build_s']:.1f} | {r['qps']:.0f} | {r['recall@10']:.3f} | "
                 f"{r['bytes_per_vector']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(L) + '\n', encoding='utf-8')
    path.with_suffix('.json').write_text(json.dumps(sections, indent=1), encoding='utf-8')
    print(f'wrote {path}')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '--eval-worker':
        _eval_worker(argv[1], int(argv[2]), int(argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test of the script')
    p.add_argument('--output', default=str(RESULTS))
    args = p.parse_args(argv)
    start = time.time()
    q = args.quick
    peak = sgemm_peak()
    sections: Dict[str, object] = {}
    sections['head'] = [head_overhead('test_resnet', 64, 4, 2)] if q else [
        head_overhead('resnet50', 224, 32, 3), head_overhead('resnet18', 112, 32, 5)]
    sections['pool'] = pooling_kernels(2 if q else 32, 3 if q else 20)
    sections['stride'] = [stride_cost('test_resnet', 64, 4, 2)] if q else [
        stride_cost('resnet50', 224, 32, 3), stride_cost('tf_efficientnet_lite0', 224, 32, 3)]
    sections['train'] = [training_throughput('test_resnet', 64, 8, 2)] if q else [
        training_throughput('resnet18', 112, 32, 5), training_throughput('resnet50', 224, 32, 2)]
    sections['eval'] = evaluation([2000] if q else [20000, 60000, 120000], [64] if q else [512, 1536], peak,
                                  timeout=60 if q else 1800)
    sections['index_n'], sections['index_d'], sections['index_q'] = (5000, 64, 200) if q else (100000, 512, 2000)
    sections['index'] = index_search(sections['index_n'], sections['index_d'], sections['index_q'])
    write(Path(args.output), sections, time.time() - start, 'python benchmarks/speed.py ' + ' '.join(argv), peak)


if __name__ == '__main__':
    main()
