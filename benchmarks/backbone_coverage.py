"""Which timm families work with cgd_heads, and does stripping the last stride double their final map?

For one representative per timm model module (the smallest non-test model, sized on the meta device), build
``create_model(name, stride_mode=mode)`` for mode in (None, 'strip', 'dilate') on the CPU with random weights and
record: builds, final feature map before/after, embedding shape, backward pass, seconds. Writes
``benchmarks/results/backbone_coverage.md``.

    python benchmarks/backbone_coverage.py                      # all families, ~20-40 min on 2 CPU cores
    python benchmarks/backbone_coverage.py --modules resnet vgg  # a subset
    python benchmarks/backbone_coverage.py --merge --modules hrnet  # re-check some rows of the committed report
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
from cgd_heads.models.stride import feature_map_size

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


def input_size(pretrained_cfg: Dict[str, object], multiple: int) -> Tuple[int, int, int]:
    """The model's own input size, rounded up to a multiple of its total reduction so 'doubled' is exact.

    E.g. 176 -> 192 for a stride-32 CNN, 224 -> 256 for a stride-64 one (at 224 its 7x7 map would end 4x4 and a
    correct strip would give 7x7, not 8x8). ``multiple=1`` keeps the size (token models).
    """
    c, h, w = pretrained_cfg.get('input_size') or (3, 224, 224)
    return c, -(-h // multiple) * multiple, -(-w // multiple) * multiple


class Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Timeout()


def total_reduction(model: torch.nn.Module) -> Tuple[int, List[int]]:
    """(the multiple to round CNN inputs to, the reductions of the feature_info stages) of an untouched backbone."""
    reductions = [int(f['reduction']) for f in getattr(model, 'feature_info', []) if 'reduction' in f]
    # the final reduction, not a fixed 32: a patch-14 vision tower at 546 px must stay a multiple of 14
    return (reductions[-1] if reductions else 32), reductions


def check(name: str, mode: Optional[str], seconds: int, multiple: Optional[int] = None) -> Dict[str, object]:
    """Build, forward and backward one model in one stride mode (mode None first: it fixes ``multiple``)."""
    row: Dict[str, object] = {'mode': str(mode)}
    start = time.time()
    signal.alarm(seconds)
    try:
        torch.manual_seed(0)
        model = create_model(name, descriptors='SMG', embed_dim=48, num_classes=4, stride_mode=mode)
        if mode is None:
            multiple, row['reductions'] = total_reduction(model.backbone)
            row['multiple'] = multiple
        size = input_size(model.pretrained_cfg, multiple if model.head.input_fmt != 'NLC' else 1)
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
    p.add_argument('--merge', action='store_true',
                   help='re-check --modules only and keep every other row of the existing --output report')
    args = p.parse_args()
    if args.merge and not (args.modules and Path(args.output).is_file()):
        p.error('--merge needs --modules and an existing --output report')
    unknown = sorted(set(args.modules or []) - set(timm.list_modules()))
    if unknown:
        p.error(f'--modules {unknown} are not timm model modules; see timm.list_modules()')
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    rows: List[Dict[str, object]] = []
    for module in args.modules or timm.list_modules():
        name = representative(module)
        if name is None:
            rows.append({'module': module, 'model': '-', 'results': []})
            continue
        results = [check(name, None, args.timeout)]
        results += [check(name, mode, args.timeout, results[0].get('multiple', 32)) for mode in MODES[1:]]
        rows.append({'module': module, 'model': name, 'results': results})
        print(module, name, [(r['mode'], r.get('map'), r['status'][:60]) for r in results], flush=True)
    lines = {row['module']: report_line(row) for row in rows}
    commands = ['python benchmarks/backbone_coverage.py' + (f' --modules {" ".join(args.modules)}' if args.modules
                                                           else '')]
    if args.merge:
        kept = read_report(Path(args.output))
        timeout = f' --timeout {args.timeout}' if args.timeout != p.get_default('timeout') else ''
        commands = [*kept['commands'],
                    f'python benchmarks/backbone_coverage.py --merge --modules {" ".join(args.modules)}{timeout}']
        lines = {**kept['lines'], **lines}
    write_report(dict(sorted(lines.items())), Path(args.output), time.time() - started, commands)


STRIPPED = ('doubles (strip, dilate)', 'doubles (strip only)')
ISOTROPIC = 'isotropic: one patch-embedding step, nothing to strip'
#: why the families that strip_last_stride refuses cannot be doubled (read from their failure and timm's source; the
#: failure column of the table holds the error itself)
WHY_NOT = {
    'efficientformer_v2': 'the last stage\'s attention reshapes to the resolution fixed at construction (its '
                          'attention biases index a 7x7 grid)',
    'gcvit': 'its global-context attention takes global query tokens made for a window count fixed at construction',
    'hrnet': 'the 1/32 branch is created and fused with the others inside stage 4; the final map adds it to the '
             'downsampled head, so no single step can be removed without changing every fusion layer',
    'mobilenetv5': 'its multi-scale fusion adapter resizes the output to a fixed 16x16 (at 256 px) whatever the stride',
    'visformer': 'a learned position embedding of the fixed 7x7 size is added after the last downsampling',
}


def _verdict(row: Dict[str, object]) -> str:
    base, strip, dilate = row['results']
    if base['status'] != 'ok':
        return 'does not build/run with cgd_heads'
    if base['fmt'] == 'NLC':
        return 'tokens: pooled as NLC, nothing to strip'
    h, w = (int(v) for v in base['map'].split('x'))

    def doubled(r: Dict[str, object]) -> bool:
        return r['status'] == 'ok' and r['map'] == f'{2 * h}x{2 * w}'
    verdict = {(True, True): STRIPPED[0], (True, False): STRIPPED[1], (False, True): 'doubles (dilate only)',
               (False, False): 'not stripped'}[(doubled(strip), doubled(dilate))]
    if verdict == 'not stripped' and len(set(base.get('reductions', []))) == 1:
        return ISOTROPIC  # every stage at the patch embedding's resolution, like a plain ViT
    return verdict


def report_line(row: Dict[str, object]) -> Tuple[str, str]:
    """(table line, verdict) of one module."""
    if not row['results']:
        return f"| {row['module']} | - | | | | | | no model constructible | | |", 'no model constructible'
    base, strip, dilate = row['results']
    verdict = _verdict(row)
    failures = '; '.join(f"{r['mode']}: {r['status']}" for r in row['results'] if r['status'] != 'ok')
    failures = failures.replace('|', '/')
    return (f"| {row['module']} | {row['model']} | {base.get('input', '')} | {base.get('fmt', '')} | "
            f"{base.get('map', '')} | {strip.get('map', '')} | {dilate.get('map', '')} | {verdict} | "
            f"{sum(r['seconds'] for r in row['results']):.0f} | {failures} |"), verdict


HEADER = '| module | model | input | format | map (none) | map (strip) | map (dilate) | verdict | s | failure |'


def read_report(path: Path) -> Dict[str, object]:
    """The rows (module -> (line, verdict)) and generating command of an earlier report, for --merge."""
    text = path.read_text(encoding='utf-8').splitlines()
    start = text.index(HEADER) + 2
    rows = {}
    for line in text[start:]:
        if not line.startswith('| '):
            break
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0]] = (line, cells[7])
    commands_line = next((line for line in text if line.startswith('Commands: ') or line.startswith('Generated by `')),
                         '`python benchmarks/backbone_coverage.py`')
    commands = commands_line.split('`')[1::2][:1] if commands_line.startswith('Generated') else \
        commands_line.split('`')[1::2]
    return {'lines': rows, 'commands': commands}


def write_report(lines: Dict[str, Tuple[str, str]], path: Path, seconds: float, commands: List[str]) -> None:
    out = [
        '# Backbone coverage',
        '',
        'Commands: ' + '; then '.join(f'`{c}`' for c in commands) + '.',
        '',
        f'Last run {seconds / 60:.1f} min on {platform.processor() or platform.machine()} '
        f'({torch.get_num_threads()} threads), timm {timm.__version__}, torch {torch.__version__}. One representative '
        'per timm module (the smallest non-test model), random weights, `create_model(name, descriptors="SMG", '
        'embed_dim=48, stride_mode=...)`, the input size of its pretrained_cfg rounded up to a multiple of its total '
        'reduction (token models: as it is), a forward and a backward pass.',
        '',
        HEADER,
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    verdicts: Dict[str, int] = {}
    for line, verdict in lines.values():
        out.append(line)
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    not_spatial = ('tokens: pooled as NLC, nothing to strip', ISOTROPIC, 'does not build/run with cgd_heads',
                   'no model constructible')
    spatial = [v for _, v in lines.values() if v not in not_spatial]
    strip_ok = [v for v in spatial if v in STRIPPED]
    out += ['', '## Totals', '']
    out += [f'- {v}: {n}' for v, n in sorted(verdicts.items())]
    if spatial:
        out.append(f'- `strip` doubles the final map exactly in {len(strip_ok)} of {len(spatial)} hierarchical '
                   f'families with a spatial map ({100 * len(strip_ok) / len(spatial):.0f}%). Isotropic models (a '
                   'spatial map at the patch embedding\'s resolution) are counted with the token models: nothing to '
                   'strip.')
    refused = [m for m, (_, v) in lines.items() if v not in not_spatial and v not in STRIPPED]
    if refused:
        out += ['', '## Where `strip` does not double the map, and why', '']
        out += [f'- {m} ({lines[m][1]}): {WHY_NOT.get(m, "see the failure column")}.' for m in refused]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(out) + '\n', encoding='utf-8')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
