"""Results file of one ``cgd-train`` + ``cgd-eval`` run: held-out R@1 per epoch (PNG), the test metrics against the
off-the-shelf reference, and the commands. A thin reader of the run folder; it measures nothing itself.

    python benchmarks/report_run.py --run runs/cars196_recipe --commands benchmarks/recipe.sh \\
        --reference benchmarks/results/cars196_off_the_shelf.json --output benchmarks/results/cars196_recipe.md

Another seed of a command already reported: ``--seed-results 0=FIRST.md 1=SECOND.md`` adds a table of every seed
(read from those results files, since run folders are not kept; ``1=runs/FOLDER`` reads a run folder's
test_metrics.json) with their mean +- std.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

METRICS = ('recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r')


def read_run(run: Path) -> Dict[str, Any]:
    rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines() if line.strip()]
    return dict(rows=rows, config=json.loads((run / 'train_config.json').read_text()),
                test=json.loads((run / 'test_metrics.json').read_text()),
                timing=json.loads((run / 'timing.json').read_text()) if (run / 'timing.json').is_file() else {},
                # written by cgd-train before the first epoch (runs of earlier versions have none)
                start=json.loads((run / 'reference.json').read_text()) if (run / 'reference.json').is_file() else {})


def plot_curve(rows: List[Dict[str, Any]], path: Path, title: str,
               start: Optional[Dict[str, Dict[str, float]]] = None) -> None:
    """Held-out R@1 and MAP@R per epoch, the off-the-shelf held-out R@1 as dotted lines; the training loss per epoch
    for a run without held-out classes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    validated = [r for r in rows if 'val_recall@1' in r]
    if validated:
        epochs = [r['epoch'] for r in validated]
        ax.plot(epochs, [100 * r['val_recall@1'] for r in validated], 'o-', label='held-out R@1')
        ax.plot(epochs, [100 * r['val_map@r'] for r in validated], 's--', label='held-out MAP@R')
        for (label, metrics), color in zip((start or {}).items(), ('tab:gray', 'tab:red', 'tab:purple')):
            ax.axhline(100 * metrics['recall@1'], color=color, linestyle=':', label=f'R@1 before training: {label}')
        ax.set_ylabel('%')
    else:
        ax.plot([r['epoch'] for r in rows], [r['loss_total'] for r in rows], 'o-', label='training loss')
        ax.set_ylabel('loss')
    ax.set_xlabel('epoch')
    ax.set_title(textwrap.fill(title, 90), fontsize=8)  # results titles are long: wrap rather than crop
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trend(values: List[float]) -> str:
    """'still rising' when the last epoch gained more than 0.5 points on the one before, else 'flat' / 'falling'."""
    if len(values) < 2:
        return 'one epoch only'
    step = values[-1] - values[-2]
    return 'still rising' if step > 0.5 else 'falling' if step < -0.5 else 'flat'


def percent(value: Optional[float]) -> str:
    """A fraction as a percentage with 2 decimals; '-' for an epoch that was not validated."""
    return '-' if value is None else f'{100 * value:.2f}'


def selected(validated: List[Dict[str, Any]], config: Dict[str, Any]) -> Dict[str, Any]:
    """The validated epoch best/ holds: the first with the highest held-out select_metric (cgd-train keeps an epoch
    only when it improves strictly)."""
    key = 'val_' + config.get('select_metric', 'recall@1')
    return max(validated, key=lambda r: r[key])


def selection(rows: List[Dict[str, Any]], curve: List[float], png: Path, config: Dict[str, Any]) -> str:
    """The sentence saying which epoch's weights were tested and why."""
    if not curve:  # cgd-train --val-classes 0: best/ is rewritten every epoch, so it holds the last one
        return (f'No held-out classes (`--val-classes 0`): trained on all training classes; the tested weights are\n'
                f'the last epoch\'s ({rows[-1]["epoch"]}). Training loss per epoch: ![training loss]({png.name})')
    best = selected([r for r in rows if 'val_recall@1' in r], config)
    return (f'Held-out R@1 at the last epoch: {trend(curve)}; selected epoch {best["epoch"]} '
            f'(![learning curve]({png.name}))')


def start_lines(start: Dict[str, Dict[str, float]], validated: List[Dict[str, Any]],
                config: Dict[str, Any]) -> List[str]:
    """The held-out metrics cgd-train measured before training (reference.json) against the selected epoch's."""
    if not start or not validated:
        return []
    best = selected(validated, config)
    lines = ['', "Before training, on the same held-out classes (cgd-train's off-the-shelf reference, reference.json):",
             '', '| model | held-out R@1 | held-out MAP@R |', '|---|---|---|']
    lines += [f'| {label} | {percent(m["recall@1"])} | {percent(m["map@r"])} |' for label, m in start.items()]
    lines.append(f'| selected epoch ({best["epoch"]}) | {percent(best["val_recall@1"])} | '
                 f'{percent(best["val_map@r"])} |')
    return lines


def report(data: Dict[str, Any], commands: str, reference: Optional[List[Dict[str, Any]]], png: Path,
           invocation: Optional[str] = None) -> List[str]:
    """The results file's lines; ``data`` as :func:`read_run` returns it, ``reference`` the off-the-shelf rows on the
    test split (as :func:`reference_rows` reads them)."""
    rows, test, config = data['rows'], data['test'], data['config']
    # with --eval-every N > 1 the first epochs carry no held-out metrics: count the images of the first validated one
    validated = [r for r in rows if 'val_recall@1' in r]
    curve = [100 * r['val_recall@1'] for r in validated]
    held_out = f'validation on {validated[0]["val_num_queries"]} held-out images' if validated else 'no validation'
    lines = [f'- Run as `{invocation}`' if invocation else None,
             f'- Commands (`{commands}`):', '', '```bash', *Path(commands).read_text().strip().splitlines(), '```', '',
             f'- Training: {len(rows)} epochs, {sum(r["seconds"] for r in rows) / 60:.1f} min in the epochs, '
             f'{min(r["images_per_s"] for r in rows):.2f}-{max(r["images_per_s"] for r in rows):.2f} images/s '
             f'(DataLoader included); {held_out}.']
    lines = [line for line in lines if line is not None]
    # the script may name a recipe (--recipe cpu) rather than spell its settings out: the run's own record says
    lines.append(settings_line(config))
    if data['timing']:
        lines.append('- Wall time: ' + ', '.join(f'{k} {v / 60:.1f} min' for k, v in data['timing'].items()) + '.')
    lines += ['', '| epoch | lr | loss | held-out R@1 | held-out MAP@R | s |', '|---|---|---|---|---|---|']
    lines += [f'| {r["epoch"]} | {r["lr"]:.3g} | {r["loss_total"]:.3f} | {percent(r.get("val_recall@1"))} | '
              f'{percent(r.get("val_map@r"))} | {r["seconds"]:.0f} |' for r in rows]
    lines += ['', selection(rows, curve, png, config)]
    lines += start_lines(data['start'], validated, config)
    lines += ['',
              f'## Test classes ({test["num_queries"]} queries, each against all other test images)', '',
              '| model | R@1 | R@2 | R@4 | R@8 | MAP@R |', '|---|---|---|---|---|---|',
              f'| fine-tuned (`{config["model_name"]}`, {config["descriptors"]}, {config["img_size"]} px) | '
              + ' | '.join(f'{100 * test[k]:.2f}' for k in METRICS) + ' |']
    for ref in reference or []:
        lines.append(f'| off-the-shelf {ref["row"]} | ' + ' | '.join(f'{100 * ref[k][0]:.2f}' for k in METRICS) + ' |')
    if reference:
        top = max(reference, key=lambda r: r['recall@1'][0])
        gain = 100 * (test['recall@1'] - top['recall@1'][0])
        lines += ['', f'Fine-tuned vs the best off-the-shelf pooling (`{top["row"]}`): {gain:+.2f} R@1, '
                      f'{100 * (test["map@r"] - top["map@r"][0]):+.2f} MAP@R.']
    return lines


def reference_rows(path: Path) -> List[Dict[str, Any]]:
    """Off-the-shelf test rows from an ablations.py JSON (a list of rows, mean and std per metric) or from one
    ``cgd-eval --off-the-shelf ... --output`` JSON (one row; a single run, std 0)."""
    data = json.loads(path.read_text())
    if isinstance(data, list):
        return data
    ots = data['off_the_shelf']
    pool = {1.0: 'GAP', float('inf'): 'MAC'}.get(float(ots['p']), f'GeM p={float(ots["p"]):g}')
    stride = {None: 'untouched', 'strip': 'stripped', 'dilate': 'dilated'}[ots['stride_mode']]
    return [dict({k: [data[k], 0.0] for k in METRICS}, row=f'{pool}, stride {stride} (cgd-eval --off-the-shelf)')]


def settings_line(config: Dict[str, Any]) -> str:
    return '- Settings (`train_config.json`): ' + ', '.join(f'{k}={v}' for k, v in config.items()) + '.'


def check_same_command(config: Dict[str, Any], others: List[Tuple[str, Path, Dict[str, float]]]) -> List[str]:
    """Refuse seeds given twice (or this run's own) and seeds whose recorded settings differ from this run's in
    anything but the seed; return the labels whose files record no settings (results files of older versions)."""
    labels = [label for label, _, _ in others] + [str(config.get('seed', 0))]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f'--seed-results: seed {", ".join(repeated)} given twice (or it is this run\'s own seed)')
    def without_seed(line: str) -> List[str]:
        return [item for item in line.split(': ', 1)[1].rstrip('.').split(', ') if not item.startswith('seed=')]
    mine = without_seed(settings_line(config))
    unrecorded = []
    for label, path, _ in others:
        if path.is_dir():
            theirs = settings_line(json.loads((path / 'train_config.json').read_text()))
        else:
            theirs = next((line for line in path.read_text().splitlines() if line.startswith('- Settings (')), None)
        if theirs is None:
            unrecorded.append(label)
        elif without_seed(theirs) != mine:
            raise ValueError(f'--seed-results: {path} (seed {label}) was run with other settings than this run, '
                             f'not only another seed:\n  {theirs}\n  {settings_line(config)}')
    return unrecorded


def results_row(path: Path) -> Dict[str, float]:
    """The fine-tuned test row of an earlier results file of this script (R@1 ... MAP@R as fractions): runs/ is not
    kept, the committed results files are."""
    for line in path.read_text().splitlines():
        if line.startswith('| fine-tuned ('):
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')][1:]
            if len(cells) == len(METRICS):
                return {k: float(v) / 100 for k, v in zip(METRICS, cells)}
    raise ValueError(f'--seed-results: {path} has no "| fine-tuned (...) | R@1 | R@2 | R@4 | R@8 | MAP@R |" row; '
                     'give results files written by report_run.py')


def seed_lines(test: Dict[str, float], seed: Any, others: List[Tuple[str, Path, Dict[str, float]]], out: Path,
               reference: Optional[List[Dict[str, Any]]]) -> List[str]:
    """The run's test metrics beside those of other seeds of the same command, and their mean +- sample std
    (n - 1 in the denominator)."""
    rows = [(label, f'`{path}`, run folder not kept' if path.is_dir() else
             f'[{path.name}]({os.path.relpath(path, out.parent)})', values) for label, path, values in others]
    rows.append((str(seed), 'this run', {k: test[k] for k in METRICS}))
    rows.sort(key=lambda row: (not row[0].isdigit(), int(row[0]) if row[0].isdigit() else 0, row[0]))
    lines = [f'## Seeds of this command ({len(rows)})', '', '| seed | R@1 | R@2 | R@4 | R@8 | MAP@R |',
             '|---|---|---|---|---|---|']
    lines += [f'| {label} ({where}) | ' + ' | '.join(f'{100 * values[k]:.2f}' for k in METRICS) + ' |'
              for label, where, values in rows]
    # the statistics of the values as shown (2 decimals): results files of other seeds give only those, so mixing
    # them with this run's unrounded values would make a mean or std that no reader of the table can recompute
    columns = {k: [round(100 * values[k], 2) for _, _, values in rows] for k in METRICS}
    lines.append(f'| mean +- std ({len(rows)} seeds) | ' + ' | '.join(
        f'{statistics.mean(columns[k]):.2f} +- {statistics.stdev(columns[k]):.2f}' for k in METRICS) + ' |')
    lines += ['', 'std is the sample standard deviation over the seeds (n - 1 in the denominator).']
    if reference:
        top = max(reference, key=lambda r: r['recall@1'][0])
        gains = {k: [v - 100 * top[k][0] for v in columns[k]] for k in ('recall@1', 'map@r')}
        lines.append(f'Mean gain over the best off-the-shelf pooling (`{top["row"]}`): '
                     f'{statistics.mean(gains["recall@1"]):+.2f} R@1 (per seed {min(gains["recall@1"]):+.2f} to '
                     f'{max(gains["recall@1"]):+.2f}), {statistics.mean(gains["map@r"]):+.2f} MAP@R.')
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--run', required=True, help='run folder of cgd-train (metrics.jsonl, test_metrics.json)')
    p.add_argument('--commands', required=True, help='the shell script that made the run (quoted in the file)')
    p.add_argument('--reference', nargs='+', help='off-the-shelf test rows: an ablations.py JSON (--table '
                   'off_the_shelf) and/or cgd-eval --off-the-shelf JSON files')
    p.add_argument('--invocation', help='the command line that ran the script (quoted above it)')
    p.add_argument('--title', default='cgd-train + cgd-eval')
    p.add_argument('--notes', help='a Markdown file appended as written (what was tried, caveats)')
    p.add_argument('--seed-results', nargs='+', metavar='SEED=FILE|RUN', default=[],
                   help='other seeds of the same command, as results files of this script or run folders: adds a '
                        'table of every seed and their mean +- std')
    p.add_argument('--output', required=True, help='results Markdown; the PNG is written beside it')
    args = p.parse_args(argv)
    others = []
    for item in args.seed_results:
        label, sep, path = item.partition('=')
        if not sep or not label or not (Path(path).is_file() or (Path(path) / 'test_metrics.json').is_file()):
            p.error(f'--seed-results: expected SEED=FILE (a results file) or SEED=RUN (a run folder with '
                    f'test_metrics.json), got {item!r}')
        try:
            values = (json.loads((Path(path) / 'test_metrics.json').read_text()) if Path(path).is_dir()
                      else results_row(Path(path)))
            others.append((label, Path(path), values))
        except ValueError as error:
            p.error(str(error))
    out = Path(args.output)
    png = out.with_suffix('.png')
    reference = [row for path in args.reference for row in reference_rows(Path(path))] if args.reference else None
    data = read_run(Path(args.run))
    lines = [f'# {args.title}', ''] + report(data, args.commands, reference, png, args.invocation)
    if others:
        try:
            unrecorded = check_same_command(data['config'], others)
        except ValueError as error:
            p.error(str(error))
        lines += [''] + seed_lines(data['test'], data['config'].get('seed', 0), others, out, reference)
        if unrecorded:
            lines.append(f'Seed {", ".join(unrecorded)}: its results file records no settings (written before '
                         f'report_run.py quoted them), so it was not checked against this run\'s.')
    if args.notes:
        lines += ['', Path(args.notes).read_text().strip()]
    plot_curve(data['rows'], png, args.title, data['start'])
    out.write_text('\n'.join(lines) + '\n')
    print(f'wrote {out} and {png}')


if __name__ == '__main__':
    main()
