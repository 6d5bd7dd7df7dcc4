"""How much the learning-rate schedule's layout moves a fine-tuning-tier row: the same Omniglot row (ResNet-18 from
scratch, 32 px, 5 epochs, Adam 1e-3, cosine) trained with the schedule stepped per update (the library since commit
3a6a394) and per epoch (timm's epoch scheduler, as in cgd_heads 0.1.0, which made the earlier results files).

    python benchmarks/schedule_effect.py                     # the tricks table's 'neither' row, seeds 0-2, ~6 min
    python benchmarks/schedule_effect.py --row both --seeds 0

Writes benchmarks/results/schedule_effect.md (or --output).
"""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List
from unittest import mock

from timm.scheduler import CosineLRScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablations  # noqa: E402  (the benchmark's own rows, budget and data)

from cgd_heads.training import trainer  # noqa: E402
from cgd_heads.training.config import TrainConfig  # noqa: E402


def per_epoch_cosine(optimizer, config: TrainConfig, iters_per_epoch: int):
    """0.1.0's layout: the cosine evaluated once per epoch (``step(epoch)``), constant within an epoch."""
    return CosineLRScheduler(optimizer, t_initial=config.epochs, lr_min=0.0, t_in_epochs=True)


def run_row(overrides: Dict[str, object], seeds: List[int], per_epoch: bool) -> List[Dict[str, float]]:
    splits = ablations.load_splits_of('omniglot')
    _, _, model_name, weights, _, _ = ablations.DATASETS['omniglot']
    base = TrainConfig(model_name=model_name, pretrained_from=weights, descriptors='SG', embed_dim=1536,
                       batch_size=64, m_per_class=4, sched='cosine', val_classes=0, num_workers=0, progress=False,
                       eval_every=10 ** 6, **ablations.FINETUNE_BUDGET['omniglot'])
    with mock.patch.object(trainer, 'make_scheduler', per_epoch_cosine) if per_epoch else contextlib.nullcontext():
        return [ablations.run_finetune_row(overrides, base, splits, seed) for seed in seeds]


def main() -> None:
    rows = dict(ablations.TABLES['tricks'])
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--row', default='neither', choices=sorted(rows))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--output', default=str(Path(__file__).parent / 'results' / 'schedule_effect.md'))
    args = p.parse_args()
    start = time.time()
    lines = ['| schedule | ' + ' | '.join(f'seed {s} R@1' for s in args.seeds) + ' | mean R@1 | mean MAP@R |',
             '|---|' + '---|' * (len(args.seeds) + 2)]
    for label, per_epoch in (('per update (cgd_heads now)', False), ('per epoch (cgd_heads 0.1.0)', True)):
        results = run_row(rows[args.row], args.seeds, per_epoch)
        summary = ablations.summarise(results)
        lines.append(f'| {label} | ' + ' | '.join(f'{100 * r["recall@1"]:.2f}' for r in results)
                     + f' | {100 * summary["recall@1"][0]:.2f} +- {100 * summary["recall@1"][1]:.2f}'
                     f' | {100 * summary["map@r"][0]:.2f} +- {100 * summary["map@r"][1]:.2f} |')
        print(lines[-1], flush=True)
    header = [f'# Schedule layout: Omniglot fine-tuning tier, tricks row `{args.row}`', '',
              f'- Command: `{shlex.join(["python", "benchmarks/schedule_effect.py"] + sys.argv[1:])}`',
              f'- Row: {rows[args.row]} on the fine-tuning tier budget {ablations.FINETUNE_BUDGET["omniglot"]} '
              f'(ResNet-18 from scratch, batches of 64 = 16 classes x 4, cosine to 0, last epoch tested on small2, '
              f'3,120 queries); std over seeds: the sample standard deviation (n - 1), as in the ablation tables.',
              f'- Wall time {(time.time() - start) / 60:.1f} min on the 2-core CPU.', '']
    Path(args.output).write_text('\n'.join(header + lines) + '\n')
    print(f'wrote {args.output}')


if __name__ == '__main__':
    main()
