"""Which timm families work with cgd_heads, and does stripping the last stride double their final map?

For one representative per timm model module (the smallest non-test model, sized on the meta device), build
``create_model(name, stride_mode=mode)`` for mode in (None, 'strip', 'dilate') on the CPU with random weights and
record: builds, final feature map before/after, embedding shape, backward pass, seconds. Writes
``benchmarks/results/backbone_coverage.md``.

    python benchmarks/backbone_coverage.py                      # all families, ~20-40 min on 2 CPU cores
    python benchmarks/backbone_coverage.py --modules resnet vgg  # a subset
"""
from __future__ import annotations

import argparse
import platform
import signal
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch

from cgd_heads import create_model
from cgd_heads.stride import feature_map_size

RESULTS = Path(__file__).resolve().parent / 'results' / 'backbone_coverage.md'
MODES = (None, 'strip', 'dilate')


def representative(module: str) -> Optional[str]:
    """Smallest model of a timm module by parameter count (meta device: nothing is allocated)."""
    names = timm.list_models(module=module)
    candidates = [n for n in names if not n.startswith('test_')] or names
    best = None
    for name in candidates:
        try:
            with torch.device('meta'):
                count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
        except Exception:  # some constructors cannot run on meta; they are simply not candidates
            continue
        if best is None or count < best[0]:
            best = (count, name)
    return best[1] if best else None


def input_size(pretrained_cfg: Dict[str, object], round_up: bool) -> Tuple[int, int, int]:
    """The model's own input size; CNN sizes rounded up to a multiple of 32 so 'doubled' is exact (176 -> 192)."""
    c, h, w = pretrained_cfg.get('input_size') or (3, 224, 224)
    return (c, -(-h // 32) * 32, -(-w // 32) * 32) if round_up else (c, h, w)


class Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Timeout()


def check(name: str, mode: Optional[str], seconds: int) -> Dict[str, object]:
    """Build, forward and backward one model in one stride mode."""
    row: Dict[str, object] = {'mode': str(mode)}
    start = time.time()
    signal.alarm(seconds)
    try:
        torch.manual_seed(0)
        model = create_model(name, descriptors='SMG', embed_dim=48, num_classes=4, stride_mode=mode)
        size = input_size(model.pretrained_cfg, round_up=model.head.input_fmt == 'NCHW')
        row['input'] = 'x'.join(map(str, size[1:]))
        out = feature_map_size(model.backbone, size)
        row['fmt'] = model.head.input_fmt
        row['map'] = 'x'.join(map(str, out[1:] if model.head.input_fmt == 'NCHW' else out[:-1]))
        row['applied'] = str(model.config['stride_mode'])
        model.train()
        emb, logits = model.forward_train(torch.randn(2, *size))
        row['embedding'] = tuple(emb.shape)
        (emb.sum() + logits.logsumexp(1).sum()).backward()
        row['backward'] = all(p.grad is not None for p in model.head.parameters())
        row['status'] = 'ok'
    except Timeout:
        row['status'] = f'timeout > {seconds}s'
    except Exception as e:  # the report lists every failure with its reason
        row['status'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}' if str(e) else type(e).__name__
        row['trace'] = traceback.format_exc(limit=2)
    finally:
        signal.alarm(0)
    row['seconds'] = round(time.time() - start, 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--modules', nargs='*', help='timm modules to check (default: all)')
    p.add_argument('--timeout', type=int, default=240, help='seconds per model and mode')
    p.add_argument('--output', default=str(RESULTS))
    args = p.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    rows: List[Dict[str, object]] = []
    for module in args.modules or timm.list_modules():
        name = representative(module)
        if name is None:
            rows.append({'module': module, 'model': '-', 'results': []})
            continue
        results = [check(name, mode, args.timeout) for mode in MODES]
        rows.append({'module': module, 'model': name, 'results': results})
        print(module, name, [(r['mode'], r.get('map'), r['status'][:60]) for r in results], flush=True)
    write_report(rows, Path(args.output), time.time() - started)


def _verdict(row: Dict[str, object]) -> str:
    base, strip, dilate = row['results']
    if base['status'] != 'ok':
        return 'does not build/run with cgd_heads'
    if base['fmt'] == 'NLC':
        return 'tokens: pooled as NLC, nothing to strip'
    h, w = (int(v) for v in base['map'].split('x'))

    def doubled(r: Dict[str, object]) -> bool:
        return r['status'] == 'ok' and r['map'] == f'{2 * h}x{2 * w}'
    return {(True, True): 'doubles (strip, dilate)', (True, False): 'doubles (strip only)',
            (False, True): 'doubles (dilate only)', (False, False): 'not stripped'}[(doubled(strip), doubled(dilate))]


def write_report(rows: List[Dict[str, object]], path: Path, seconds: float) -> None:
    lines = [
        '# Backbone coverage',
        '',
        f'Generated by `python benchmarks/backbone_coverage.py` in {seconds / 60:.1f} min on '
        f'{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads), timm {timm.__version__}, '
        f'torch {torch.__version__}. One representative per '
        'timm module (the smallest non-test model), random weights, `create_model(name, descriptors="SMG", '
        'embed_dim=48, stride_mode=...)`, the input size of its pretrained_cfg, a forward and a backward pass.',
        '',
        '| module | model | input | format | map (none) | map (strip) | map (dilate) | verdict | s | failure |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    verdicts: Dict[str, int] = {}
    for row in rows:
        if not row['results']:
            lines.append(f"| {row['module']} | - | | | | | | no model constructible | | |")
            verdicts['no model constructible'] = verdicts.get('no model constructible', 0) + 1
            continue
        base, strip, dilate = row['results']
        verdict = _verdict(row)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        failures = '; '.join(f"{r['mode']}: {r['status']}" for r in row['results'] if r['status'] != 'ok')
        failures = failures.replace('|', '/')
        lines.append(f"| {row['module']} | {row['model']} | {base.get('input', '')} | {base.get('fmt', '')} | "
                     f"{base.get('map', '')} | {strip.get('map', '')} | {dilate.get('map', '')} | {verdict} | "
                     f"{sum(r['seconds'] for r in row['results']):.0f} | {failures} |")
    spatial = [r for r in rows
               if r['results'] and r['results'][0]['status'] == 'ok' and r['results'][0]['fmt'] != 'NLC']
    strip_ok = [r for r in spatial if _verdict(r) in ('doubles (strip, dilate)', 'doubles (strip only)')]
    lines += ['', '## Totals', '']
    lines += [f'- {v}: {n}' for v, n in sorted(verdicts.items())]
    if spatial:
        lines.append(f'- `strip` doubles the final map exactly in {len(strip_ok)} of {len(spatial)} families with a '
                     f'spatial map ({100 * len(strip_ok) / len(spatial):.0f}%).')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
