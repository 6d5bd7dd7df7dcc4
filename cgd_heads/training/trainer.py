"""CGD training: m-per-class batches, ranking + classification loss, validation-based model selection, resume.

The loop is deliberately plain (named steps, no callbacks): check the run folder, set up the processes, build the
run (model, loss, optimizer), restore it when resuming, then per epoch train, validate and checkpoint. What it
guarantees:

* Batches of ``batch_size / m_per_class`` classes x ``m_per_class`` images (PML's ``MPerClassSampler``).
* Model selection on a validation split of *training* classes, never on the test split, and before the first epoch
  the starting backbone's off-the-shelf features measured on that split (``out_dir/reference.json``), the reference
  the selected epoch should beat.
* Every epoch ends with an atomic checkpoint in ``out_dir/last`` (weights, optimizer, scheduler, AMP scaler,
  history) and, when validation improves, ``out_dir/best``. Before every epoch all random generators are re-seeded
  from ``(seed, epoch)``, so sampler order, augmentation and dropout of an epoch do not depend on what ran before:
  a run resumed with ``resume=True`` reproduces the uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import ImageDataset, ImageList, create_cgd_transform, data_config_of
from ..losses.cgd_loss import CGDLoss
from ..models.cgd_model import HEAD_KWARGS, CGDModel, create_model, load_pretrained
from ..models.checkpoint import (check_extra, config_diff, load_config, load_training_state, load_weights,
                                save_pretrained)
from ..utils.atomic import atomic_path, atomic_write_json, resolve_dir
from ..utils.checks import check_bool
from ..utils.distributed import DistributedContext, all_reduce_mean, init_distributed
from ..utils.runtime import amp_dtype, autocast, resolve_device, seed_everything
from .config import TrainConfig
from .distributed import DistributedMPerClassSampler
from .optim import describe_schedule, make_optimizer, make_scheduler
from .reference import off_the_shelf_reference, reference_verdict
from .validation import validate

__all__ = ['TrainResult', 'train', 'build_model', 'freeze_batch_norm', 'validate', 'updates_per_epoch']

_logger = logging.getLogger(__name__)
#: Settings that may change when a run is resumed (they do not change what is computed).
#: settings that change how fast a run goes, not what it computes: a resumed run may change them
_RESUMABLE_CHANGES = ('progress', 'num_workers', 'device', 'channels_last', 'compile', 'skip_reference')


@dataclass
class TrainResult:
    """What :func:`train` returns: the selected model, where it is, and the per-epoch history.

    Under torchrun only rank 0 (``is_main``) holds the selected model and the metrics; the other ranks get their
    last-epoch replica and should not evaluate or write anything.
    """
    model: CGDModel
    best_dir: Path
    last_dir: Path
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_metric: Optional[float] = None
    is_main: bool = True
    #: held-out metrics of the starting backbone's off-the-shelf features (:mod:`.reference`); empty when not measured
    reference: Dict[str, Dict[str, float]] = field(default_factory=dict)


def build_model(config: TrainConfig, num_classes: int) -> CGDModel:
    """The model a TrainConfig describes, with an auxiliary classifier for ``num_classes`` (none if aux_weight=0).

    The fields named like :func:`~cgd_heads.create_model`'s arguments (and its head options) are passed on.
    """
    names = {n for n, p in inspect.signature(create_model).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name in names or f.name in HEAD_KWARGS}
    return create_model(num_classes=num_classes if config.aux_weight > 0 else 0, **kwargs)


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode: running statistics stay those of the pretrained weights."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _check_sampler(train_list: ImageList, config: TrainConfig, held_out: bool = False) -> None:
    """``held_out``: ``config.val_classes`` classes were taken out of ``train_list`` before it got here."""
    counts = collections.Counter(train_list.labels)
    per_batch = config.batch_size // config.m_per_class
    if len(counts) < per_batch:
        # with few training classes the held-out ones can be what leaves too few: name both ways out
        after = f' (after holding out val_classes={config.val_classes})' if held_out else ''
        fixes = ' or hold out fewer classes (e.g. val_classes=0.2)' if held_out else ''
        raise ValueError(f'the training split has {len(counts)} classes{after} but batch_size={config.batch_size} '
                         f'with m_per_class={config.m_per_class} needs {per_batch} per batch; lower batch_size (at '
                         f'most {len(counts) * config.m_per_class}){fixes}')
    small = sorted((n, train_list.class_names[c]) for c, n in counts.items() if n < config.m_per_class)
    if small:
        listed = ', '.join(f'{name!r} ({n})' for n, name in small[:5])
        raise ValueError(f'{len(small)} training classes have fewer than m_per_class={config.m_per_class} images, '
                         f'e.g. {listed}; lower m_per_class or remove those classes')


class _TrainStep(nn.Module):
    """``forward = model.forward_train``: DistributedDataParallel only synchronises what runs through forward()."""

    def __init__(self, model: CGDModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Any:
        return self.model.forward_train(images)


def updates_per_epoch(config: TrainConfig, num_images: int) -> int:
    """Optimizer updates (batches) per epoch: ``iters_per_epoch``, or one pass over ``num_images``."""
    return config.iters_per_epoch or max(1, num_images // config.batch_size)


def _loader(dataset: ImageDataset, config: TrainConfig, device: torch.device,
            context: DistributedContext) -> DataLoader:
    """A DataLoader of m-per-class batches (this rank's share of each global batch under torchrun).

    Built anew each epoch: PML's sampler permutes its class list in place, so a sampler carried over from the
    previous epoch would make the batch order depend on history."""
    iters = updates_per_epoch(config, len(dataset))
    sampler = DistributedMPerClassSampler(dataset.labels, config.m_per_class, config.batch_size,
                                          iters * config.batch_size, context.rank, context.world_size)
    return DataLoader(dataset, batch_size=config.batch_size // context.world_size, sampler=sampler,
                      num_workers=config.num_workers, drop_last=True, pin_memory=device.type == 'cuda')


def _append_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in rows), encoding='utf-8')


@dataclass
class _Run:
    """A run in progress: what the steps of :func:`train` share."""
    config: TrainConfig
    out_dir: Path
    device: torch.device
    context: DistributedContext
    dtype: Optional[torch.dtype]
    model: CGDModel
    data_config: Dict[str, Any]
    criterion: CGDLoss
    step: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    iters: int
    start_epoch: int = 0
    best_metric: Optional[float] = None
    history: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def last_dir(self) -> Path:
        return self.out_dir / 'last'

    @property
    def best_dir(self) -> Path:
        return self.out_dir / 'best'


def _check_run_folder(out_dir: Path, resume: bool) -> None:
    has_run = resolve_dir(out_dir / 'last').exists()
    if has_run and not resume:
        raise ValueError(f'{out_dir} already holds a training run; pass resume=True (--resume) to continue it or '
                         f'choose another output folder')
    if resume and not has_run:
        raise ValueError(f'nothing to resume: {out_dir / "last"} does not exist')


def _setup_processes(config: TrainConfig) -> Tuple[torch.device, DistributedContext]:
    """The device and the torchrun context (one process without torchrun); each rank on its own GPU."""
    device = resolve_device(config.device)
    context = init_distributed(device.type)
    if context.enabled and device.type == 'cuda':
        device = torch.device('cuda', context.local_rank)
        torch.cuda.set_device(device)
    if config.batch_size % context.world_size:
        raise ValueError(f'batch_size={config.batch_size} (the global batch) must be divisible by the '
                         f'{context.world_size} processes')
    return device, context


def _build_run(config: TrainConfig, train_list: ImageList, out_dir: Path, device: torch.device,
               context: DistributedContext) -> _Run:
    """Model, loss, the step DDP wraps, optimizer, schedule and gradient scaler, from the seed."""
    dtype = amp_dtype(config.amp, device)
    seed_everything(config.seed)
    model = build_model(config, train_list.num_classes).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = CGDLoss(margin=config.margin, aux_weight=config.aux_weight, ranking_weight=config.ranking_weight,
                        aux_loss=model.head.aux_head.loss if model.head.aux_head is not None else None)
    step: nn.Module = _TrainStep(model)
    if context.enabled:
        criterion.make_distributed(context.world_size)
        # backbones keep layers forward_features never uses (e.g. ConvNeXt's head norm): let DDP skip them
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)
    if config.compile:
        step = torch.compile(step)
    optimizer = make_optimizer(model, config)
    iters = updates_per_epoch(config, len(train_list))
    if context.is_main:
        _logger.info('learning rate: %s', describe_schedule(config, iters))
    return _Run(config=config, out_dir=out_dir, device=device, context=context, dtype=dtype, model=model,
                data_config=data_config_of(model, config.img_size, config.resize_size), criterion=criterion,
                step=step, optimizer=optimizer, scheduler=make_scheduler(optimizer, config, iters), iters=iters,
                scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))


def _restore(run: _Run, class_names: List[str]) -> None:
    """Continue from ``last/``: the saved settings and training classes must match, then weights, optimizer,
    schedule and history."""
    saved = load_config(run.last_dir)
    now = {k: v for k, v in dataclasses.asdict(run.config).items() if k not in _RESUMABLE_CHANGES}
    diff = config_diff(now, {k: v for k, v in saved.get('train', {}).items() if k not in _RESUMABLE_CHANGES})
    if diff:
        raise ValueError(f'cannot resume {run.out_dir}: the settings differ from the saved run: {"; ".join(diff)} '
                         f'(now != saved)')
    # the settings do not name the data: a run resumed on other classes would carry on silently (or fail on a
    # classifier size mismatch that names no option)
    saved_names = saved.get('class_names')
    if saved_names is not None and list(saved_names) != list(class_names):
        changed = sorted(set(map(str, class_names)) ^ set(map(str, saved_names)))
        raise ValueError(f'cannot resume {run.out_dir}: its training classes differ from the saved run\'s '
                         f'({len(class_names)} now, {len(saved_names)} saved; e.g. {changed[:3]}): resume with the '
                         f'same data and class split (data, dataset, train_classes, val_classes, seed)')
    state = load_training_state(run.last_dir, map_location=run.device)
    load_weights(run.model, run.last_dir, run.device)
    run.optimizer.load_state_dict(state['optimizer'])
    if run.scheduler is not None and state['scheduler'] is not None:  # None: saved when 'none' ignored warm-up
        run.scheduler.load_state_dict(state['scheduler'])
    if state['scaler']:  # empty when saved without a float16 scaler (float32 / bf16): nothing to restore
        run.scaler.load_state_dict(state['scaler'])
    run.start_epoch, run.best_metric, run.history = state['epoch'] + 1, state['best_metric'], state['history']
    _logger.info('resuming %s at epoch %d', run.out_dir, run.start_epoch + 1)


def _train_epoch(run: _Run, dataset: ImageDataset, epoch: int) -> Dict[str, Any]:
    """One epoch of m-per-class batches; returns its log row (learning rates, mean losses, images/s)."""
    config, device = run.config, run.device
    seed_everything(config.seed * 100003 + epoch)  # epoch state is a function of (seed, epoch): exact resume
    loader = _loader(dataset, config, device, run.context)
    run.model.train()
    if config.freeze_bn:
        freeze_batch_norm(run.model.backbone)
    totals: Dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
    used_lrs = [group['lr'] for group in run.optimizer.param_groups]
    start, seen = time.time(), 0
    bar = tqdm(loader, desc=f'epoch {epoch + 1}/{config.epochs}', unit='batch', disable=not config.progress)
    for update, (images, labels) in enumerate(bar, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        used_lrs = [group['lr'] for group in run.optimizer.param_groups]  # logged: the rates of the epoch's last update
        _train_step(run, images, labels, epoch)
        if run.scheduler is not None:  # per update: a drop inside an epoch applies there
            run.scheduler.step_update(epoch * run.iters + update)
        seen += len(labels)
        for key, value in run.criterion.last_parts.items():
            totals[key] = totals[key] + value if key in totals else value
        if config.progress and bar.n % 10 == 0:
            bar.set_postfix(loss=f'{float(run.criterion.last_parts["total"]):.4f}',
                            img_s=f'{seen / (time.time() - start):.1f}')
    steps, seconds = len(loader), time.time() - start
    row: Dict[str, Any] = {'epoch': epoch + 1, 'lr': used_lrs[0],
                           'seconds': round(seconds, 2), 'images_per_s': round(seen / seconds, 2)}
    if config.head_lr is not None:
        row['head_lr'] = used_lrs[-1]
    row.update({f'loss_{k}': float(all_reduce_mean(v, run.context)) / steps for k, v in totals.items()})
    row['images_per_s'] = round(row['images_per_s'] * run.context.world_size, 2)
    return row


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, epoch: int) -> None:
    with autocast(run.device, run.dtype):
        embeddings, logits = run.step(images)
    loss = run.criterion(embeddings, labels, logits)
    if not torch.isfinite(loss):
        raise FloatingPointError(f'non-finite loss {loss.item()} at epoch {epoch + 1}; parts '
                                 f'{ {k: float(v) for k, v in run.criterion.last_parts.items()} }. Lower lr or '
                                 f'use --amp none; the last checkpoint in {run.last_dir} is intact')
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.config.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def _validate_epoch(run: _Run, row: Dict[str, Any], val_list: Optional[ImageList], epoch: int) -> bool:
    """Validate when due (adding ``val_*`` to ``row``); True when this epoch's model is the best so far."""
    config = run.config
    if val_list is None:
        return True  # nothing to select with: the latest model is the best we know
    if (epoch + 1) % config.eval_every and epoch + 1 != config.epochs:
        return False
    metrics = validate(run.model, val_list, run.data_config, run.device, config.eval_batch_size, config.num_workers,
                       run.dtype, progress=False)
    row.update({f'val_{k}': v for k, v in metrics.items()})
    score = metrics[config.select_metric]
    improved = run.best_metric is None or score > run.best_metric
    run.best_metric = score if improved else run.best_metric
    return improved


def _save_epoch(run: _Run, row: Dict[str, Any], improved: bool, ckpt_extra: Dict[str, Any], epoch: int) -> None:
    """Log the row, write ``best/`` when improved, then ``last/`` with the training state, then the history."""
    run.history.append(row)
    # 4 significant digits, not 4 decimals: a learning rate of 5e-05 must not read as 0.0001
    _logger.info('epoch %d: %s', epoch + 1, {k: float(f'{v:.4g}') if isinstance(v, float) else v
                                             for k, v in row.items()})
    extra = dict(ckpt_extra, epoch=epoch + 1, metrics=row)
    if improved:
        save_pretrained(run.model, run.best_dir, extra=extra)
    state = {'optimizer': run.optimizer.state_dict(),
             'scheduler': run.scheduler.state_dict() if run.scheduler else None,
             'scaler': run.scaler.state_dict(), 'epoch': epoch, 'best_metric': run.best_metric,
             'history': run.history}
    save_pretrained(run.model, run.last_dir, extra=extra, training_state=state)
    _append_jsonl(run.out_dir / 'metrics.jsonl', run.history)


def _measure_reference(run: _Run, val_list: Optional[ImageList]) -> Dict[str, Dict[str, float]]:
    """The off-the-shelf reference on the held-out classes, measured once per run folder (``reference.json``)."""
    path = run.out_dir / 'reference.json'
    if val_list is None or run.config.skip_reference:
        return {}
    # only a resumed run reuses it: a file left by a run killed before its first checkpoint may be for
    # another model, stride or held-out split
    if path.is_file() and run.start_epoch > 0:
        rows = json.loads(path.read_text(encoding='utf-8'))
        when = 'measured when the run started'
    else:
        start = time.time()
        rows = off_the_shelf_reference(run.config, val_list, run.data_config, run.device, run.dtype)
        with atomic_path(path) as tmp:  # in the order measured: the run's stride mode first
            tmp.write_text(json.dumps(rows, indent=2) + '\n', encoding='utf-8')
        when = ('before training' if run.start_epoch == 0 else
                f'at epoch {run.start_epoch + 1} (the run started without a reference)')
        if rows:
            _logger.info('off-the-shelf reference measured in %.0f s (--skip-reference to skip it)',
                         time.time() - start)
    for label, metrics in rows.items():
        _logger.info('%s, %s: held-out recall@1 %.2f, map@r %.2f', when, label, 100 * metrics['recall@1'],
                     100 * metrics['map@r'])
    return rows


def describe_selection(config: TrainConfig, val_list: Optional[ImageList]) -> str:
    """What ``best/`` will hold: the best validated epoch, or the last one when nothing is held out."""
    if val_list is None:
        return ("none (no held-out classes: val_classes=0); best/ holds the last epoch's weights, so choose the "
                "number of epochs on a run with held-out classes first")
    if config.eval_every >= config.epochs and config.epochs > 1:
        every = 'after the last epoch only'
    elif config.eval_every > 1:
        every = f'every {config.eval_every} epochs and after the last'
    else:
        every = 'after every epoch'
    return (f'best/ keeps the epoch with the highest {config.select_metric} on {val_list.num_classes} held-out '
            f'classes ({len(val_list)} images), validated {every}')


def _check_val_list(val_list: ImageList) -> None:
    """ValueError before training when the held-out images cannot measure retrieval (no class with two images)."""
    counts = collections.Counter(val_list.labels)
    if max(counts.values(), default=0) < 2:
        raise ValueError(f'the held-out classes ({len(val_list)} images) have no class with 2 images, so no query '
                         f'has a correct match to find: hold out more classes (val_classes) or none (val_classes=0)')
    if len(counts) < 2:  # every neighbour is then of the query's class: recall@1 = map@r = 1 at every epoch
        raise ValueError(f'the held-out images are of {len(counts)} class; model selection needs at least 2 '
                         f'held-out classes (e.g. val_classes=0.2, or an integer >= 2), or none (val_classes=0)')


def train(
        config: TrainConfig,
        train_list: ImageList,
        out_dir: Union[str, Path],
        resume: bool = False,
        val_list: Optional[ImageList] = None,
        skip_bad_images: bool = False,
        extra: Optional[Dict[str, Any]] = None,
) -> TrainResult:
    """Train a CGD model on ``train_list`` and write checkpoints under ``out_dir``.

    Args:
        config: The run's settings.
        train_list: Training images; ``config.val_classes`` of its classes are held out for validation unless
            ``val_list`` is given.
        out_dir: Run folder: ``train_config.json``, ``metrics.jsonl``, ``last/``, ``best/``, and with held-out
            classes ``reference.json`` (the starting backbone's off-the-shelf metrics on them, :mod:`.reference`).
        resume: Continue from ``out_dir/last``. Without it an existing run in ``out_dir`` is an error (never
            overwritten).
        val_list: Explicit validation images (classes disjoint from training), instead of ``val_classes``.
        skip_bad_images: Skip unreadable images (logged) instead of failing.
        extra: JSON entries added to the checkpoints' ``config.json`` (e.g. the data set name).

    Returns:
        A :class:`TrainResult` whose model holds the best validation weights (the last ones without validation).
    """
    out_dir = Path(out_dir)
    resume, skip_bad_images = check_bool(resume, 'resume'), check_bool(skip_bad_images, 'skip_bad_images')
    check_extra(extra)  # here, not at the first checkpoint an epoch later
    _check_run_folder(out_dir, resume)
    held_out = val_list is None and bool(config.val_classes)
    if held_out:
        try:
            train_list, val_list = train_list.split_classes(config.val_classes, seed=config.seed)
        except ValueError as e:  # name the option the user set, not split_classes' argument
            raise ValueError(f'val_classes={config.val_classes!r}: {e}') from e
    if skip_bad_images:  # checked once, before the sampler check and the schedule count the images
        train_list = ImageDataset(train_list, skip_bad_images=True).image_list
    _check_sampler(train_list, config, held_out=held_out)
    if val_list is not None:
        if skip_bad_images:  # checked once here: validation and the reference read these images again and again
            val_list = ImageDataset(val_list, skip_bad_images=True).image_list
        _check_val_list(val_list)
    device, context = _setup_processes(config)
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    run = _build_run(config, train_list, out_dir, device, context)
    if context.is_main:
        _logger.info('model selection: %s', describe_selection(config, val_list))
    if resume:
        _restore(run, train_list.class_names)
    run_config = dataclasses.asdict(config)
    if context.is_main:
        atomic_write_json(out_dir / 'train_config.json', run_config)
    dataset = ImageDataset(train_list, create_cgd_transform(run.data_config, True, config.img_size,
                                                            config.resize_size))
    ckpt_extra = dict(extra or {}, data=run.data_config, train=run_config, class_names=train_list.class_names)
    reference = _measure_reference(run, val_list) if context.is_main else {}
    context.barrier()
    for epoch in range(run.start_epoch, config.epochs):
        row = _train_epoch(run, dataset, epoch)
        if run.scheduler is not None:
            run.scheduler.step(epoch + 1)  # a no-op for per-update schedules; steps those saved by v0.1 (per epoch)
        if context.is_main:  # rank 0 validates and writes; the others wait for it
            _save_epoch(run, row, _validate_epoch(run, row, val_list, epoch), ckpt_extra, epoch)
        context.barrier()
    if not context.is_main:
        return TrainResult(run.model, run.best_dir, run.last_dir, run.history, run.best_metric, is_main=False)
    verdict = reference_verdict(run.best_metric, reference, config.select_metric)
    if verdict is not None:
        (_logger.info if verdict[0] else _logger.warning)(verdict[1])
    best = load_pretrained(run.best_dir, map_location=device) if resolve_dir(run.best_dir).exists() else run.model
    return TrainResult(best, run.best_dir, run.last_dir, run.history, run.best_metric, reference=reference)
