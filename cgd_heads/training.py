"""CGD training: m-per-class batches, ranking + classification loss, validation-based model selection, resume.

The loop is deliberately plain (one function, no callbacks). What it guarantees:

* Batches of ``batch_size / m_per_class`` classes x ``m_per_class`` images (PML's ``MPerClassSampler``).
* Model selection on a validation split of *training* classes, never on the test split.
* Every epoch ends with an atomic checkpoint in ``out_dir/last`` (weights, optimizer, scheduler, AMP scaler,
  history) and, when validation improves, ``out_dir/best``. Before every epoch all random generators are re-seeded
  from ``(seed, epoch)``, so sampler order, augmentation and dropout of an epoch do not depend on what ran before:
  a run resumed with ``resume=True`` reproduces the uninterrupted run.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_model
from timm.scheduler import create_scheduler_v2
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import atomic_path, resolve_dir
from .checkpoint import (WEIGHTS_NAME, config_diff, load_config, load_pretrained, load_training_state,
                         save_pretrained)
from .data import ImageDataset, ImageList, create_cgd_transform
from .distributed import DistributedContext, DistributedMPerClassSampler, all_reduce_mean, init_distributed
from .extract import extract_embeddings
from .loss import CGDLoss
from .metrics import evaluate_retrieval
from .model import CGDModel, create_model
from .runtime import amp_dtype, autocast, resolve_device, seed_everything

__all__ = ['TrainConfig', 'TrainResult', 'train', 'build_model', 'data_config_of', 'freeze_batch_norm']

_logger = logging.getLogger(__name__)

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('step', 'cosine', 'none')


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``train_config.json``). Defaults: the CGD recipe."""
    model_name: str = 'resnet50'
    descriptors: str = 'SG'
    embed_dim: int = 1536
    stride_mode: Optional[str] = 'strip'
    pretrained: bool = False
    checkpoint_path: Optional[str] = None
    pretrained_from: Optional[str] = None  #: a pip package shipping ImageNet weights (see cgd_heads.weights)
    combine: str = 'concat'
    gem_p: float = 3.0
    learnable_p: bool = False
    temperature: float = 0.5
    label_smoothing: float = 0.1
    margin: float = 0.1
    aux_weight: float = 1.0  #: 0 trains with the ranking loss only (no classifier is built)
    ranking_weight: float = 1.0  #: 0 trains with the classification loss only (an ablation)
    img_size: int = 224
    resize_size: Optional[int] = None  #: train-time resize before the random crop; default img_size * 252 / 224
    batch_size: int = 128
    m_per_class: int = 4
    iters_per_epoch: Optional[int] = None  #: default: one pass over the training images
    epochs: int = 20
    optimizer: str = 'adam'
    lr: float = 1e-4
    #: learning rate of the head (descriptor FCs, classifier, learnable p); default: ``lr``. The head starts from
    #: random weights while a pretrained backbone should move slowly, so short fine-tunes profit from a larger one
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    sched: str = 'step'  #: 'step': x0.1 at 60% and 80% of the epochs; 'cosine'; 'none'
    warmup_epochs: int = 0
    freeze_bn: bool = False
    clip_grad: Optional[float] = None
    amp: str = 'auto'  #: 'auto' = bf16 (fp16 without bf16 support) on CUDA, none on CPU
    device: str = 'auto'
    seed: int = 0
    num_workers: int = 2
    val_classes: float = 0.1  #: classes held out of training for model selection: fraction or count; 0 = none
    eval_every: int = 1
    eval_batch_size: int = 128
    select_metric: str = 'recall@1'
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ('embed_dim', 'img_size', 'batch_size', 'm_per_class', 'epochs', 'eval_every',
                     'eval_batch_size'):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        if self.batch_size % self.m_per_class:
            raise ValueError(f'batch_size={self.batch_size} must be a multiple of m_per_class={self.m_per_class} '
                             f'(batches hold batch_size / m classes of m images)')
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}')
        if self.sched not in SCHEDULES:
            raise ValueError(f'sched must be one of {SCHEDULES}, got {self.sched!r}')
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f'lr must be a finite float > 0, got {self.lr!r}')
        if self.head_lr is not None and not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise ValueError(f'head_lr must be a finite float > 0 or None (= lr), got {self.head_lr!r}')
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError('weight_decay, warmup_epochs and num_workers must be >= 0')
        if self.aux_weight < 0 or self.ranking_weight < 0 or self.aux_weight == self.ranking_weight == 0:
            raise ValueError(f'aux_weight and ranking_weight must be >= 0 and not both 0, got {self.aux_weight} and '
                             f'{self.ranking_weight}')
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f'clip_grad must be > 0 or None, got {self.clip_grad!r}')
        if self.val_classes < 0:
            raise ValueError(f'val_classes must be >= 0 (a fraction < 1 or a class count), got {self.val_classes!r}')
        if self.select_metric not in ('recall@1', 'map@r', 'precision@1'):
            raise ValueError(f"select_metric must be 'recall@1', 'map@r' or 'precision@1', got {self.select_metric!r}")
        if self.iters_per_epoch is not None and self.iters_per_epoch < 1:
            raise ValueError(f'iters_per_epoch must be a positive int or None, got {self.iters_per_epoch!r}')


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


def build_model(config: TrainConfig, num_classes: int) -> CGDModel:
    """The model a TrainConfig describes, with an auxiliary classifier for ``num_classes`` (none if aux_weight=0)."""
    return create_model(
        config.model_name, descriptors=config.descriptors, embed_dim=config.embed_dim,
        num_classes=num_classes if config.aux_weight > 0 else 0, pretrained=config.pretrained,
        stride_mode=config.stride_mode, checkpoint_path=config.checkpoint_path,
        pretrained_from=config.pretrained_from, combine=config.combine,
        gem_p=config.gem_p, learnable_p=config.learnable_p, temperature=config.temperature,
        label_smoothing=config.label_smoothing)


def data_config_of(model: nn.Module, img_size: int, resize_size: Optional[int] = None) -> Dict[str, Any]:
    """Preprocessing of a model (timm's mean/std/interpolation) plus the CGD sizes, as stored in checkpoints."""
    cfg = timm.data.resolve_model_data_config(model)
    return {'mean': list(cfg['mean']), 'std': list(cfg['std']), 'interpolation': cfg.get('interpolation', 'bilinear'),
            'img_size': img_size, 'resize_size': resize_size}


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode: running statistics stay those of the pretrained weights."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _check_sampler(train_list: ImageList, config: TrainConfig) -> None:
    counts = collections.Counter(train_list.labels)
    per_batch = config.batch_size // config.m_per_class
    if len(counts) < per_batch:
        raise ValueError(f'the training split has {len(counts)} classes but batch_size={config.batch_size} with '
                         f'm_per_class={config.m_per_class} needs {per_batch} per batch; lower batch_size')
    small = sorted((n, train_list.class_names[c]) for c, n in counts.items() if n < config.m_per_class)
    if small:
        listed = ', '.join(f'{name!r} ({n})' for n, name in small[:5])
        raise ValueError(f'{len(small)} training classes have fewer than m_per_class={config.m_per_class} images, '
                         f'e.g. {listed}; lower m_per_class or remove those classes')


def _make_optimizer(model: CGDModel, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, one group at ``lr``; with ``head_lr``, group 0 is the backbone
    at ``lr`` and group 1 the head at ``head_lr``."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: List[Dict[str, Any]] = [{'params': trainable}]
    if config.head_lr is not None:  # one group otherwise: optimizer states saved before head_lr existed still load
        head = {id(p) for p in model.head.parameters()}
        groups = [{'params': [p for p in trainable if id(p) not in head]},
                  {'params': [p for p in trainable if id(p) in head], 'lr': config.head_lr}]
        groups = [g for g in groups if g['params']]  # an empty group would only confuse the schedulers
    if config.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == 'adamw' else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    if config.sched == 'none':
        return None
    if config.sched == 'step':
        milestones = sorted({max(1, round(config.epochs * f)) for f in (0.6, 0.8)})
        return create_scheduler_v2(optimizer, sched='multistep', num_epochs=config.epochs,
                                   decay_milestones=milestones, decay_rate=0.1, warmup_epochs=config.warmup_epochs,
                                   warmup_lr=config.lr * 0.01)[0]
    return create_scheduler_v2(optimizer, sched='cosine', num_epochs=config.epochs,
                               warmup_epochs=config.warmup_epochs, warmup_lr=config.lr * 0.01)[0]


class _TrainStep(nn.Module):
    """``forward = model.forward_train``: DistributedDataParallel only synchronises what runs through forward()."""

    def __init__(self, model: CGDModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Any:
        return self.model.forward_train(images)


def _loader(dataset: ImageDataset, config: TrainConfig, device: torch.device,
            context: DistributedContext) -> DataLoader:
    """A DataLoader of m-per-class batches (this rank's share of each global batch under torchrun).

    Built anew each epoch: PML's sampler permutes its class list in place, so a sampler carried over from the
    previous epoch would make the batch order depend on history."""
    iters = config.iters_per_epoch or max(1, len(dataset) // config.batch_size)
    sampler = DistributedMPerClassSampler(dataset.labels, config.m_per_class, config.batch_size,
                                          iters * config.batch_size, context.rank, context.world_size)
    return DataLoader(dataset, batch_size=config.batch_size // context.world_size, sampler=sampler,
                      num_workers=config.num_workers, drop_last=True, pin_memory=device.type == 'cuda')


def validate(model: nn.Module, image_list: ImageList, data_config: Dict[str, Any], device: torch.device,
             batch_size: int = 128, num_workers: int = 0, amp: Optional[torch.dtype] = None,
             progress: bool = False) -> Dict[str, float]:
    """Recall@1/2/4/8, precision@1 and MAP@R of ``model`` on ``image_list`` (every image a query vs the rest)."""
    dataset = ImageDataset(image_list, create_cgd_transform(data_config, False, data_config['img_size']))
    embeddings, labels = extract_embeddings(model, dataset, batch_size=batch_size, device=device,
                                            num_workers=num_workers, amp_dtype=amp, progress=progress)
    return evaluate_retrieval(embeddings, labels, ks=(1, 2, 4, 8))


def _append_jsonl(path: Path, rows: List[Dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(''.join(json.dumps(r, sort_keys=True) + '\n' for r in rows), encoding='utf-8')


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
        out_dir: Run folder: ``train_config.json``, ``metrics.jsonl``, ``last/``, ``best/``.
        resume: Continue from ``out_dir/last``. Without it an existing run in ``out_dir`` is an error (never
            overwritten).
        val_list: Explicit validation images (classes disjoint from training), instead of ``val_classes``.
        skip_bad_images: Skip unreadable images (logged) instead of failing.
        extra: JSON entries added to the checkpoints' ``config.json`` (e.g. the data set name).

    Returns:
        A :class:`TrainResult` whose model holds the best validation weights (the last ones without validation).
    """
    out_dir = Path(out_dir)
    last_dir, best_dir = out_dir / 'last', out_dir / 'best'
    has_run = resolve_dir(last_dir).exists()
    if has_run and not resume:
        raise ValueError(f'{out_dir} already holds a training run; pass resume=True (--resume) to continue it or '
                         f'choose another output folder')
    if resume and not has_run:
        raise ValueError(f'nothing to resume: {last_dir} does not exist')
    if val_list is None and config.val_classes:
        train_list, val_list = train_list.split_classes(config.val_classes, seed=config.seed)
    _check_sampler(train_list, config)

    device = resolve_device(config.device)
    context = init_distributed(device.type)
    if context.enabled and device.type == 'cuda':
        device = torch.device('cuda', context.local_rank)
        torch.cuda.set_device(device)
    if config.batch_size % context.world_size:
        raise ValueError(f'batch_size={config.batch_size} (the global batch) must be divisible by the '
                         f'{context.world_size} processes')
    if context.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    dtype = amp_dtype(config.amp, device)
    seed_everything(config.seed)
    model = build_model(config, train_list.num_classes).to(device)
    data_config = data_config_of(model, config.img_size, config.resize_size)
    criterion = CGDLoss(margin=config.margin, aux_weight=config.aux_weight, ranking_weight=config.ranking_weight,
                        aux_loss=model.head.aux_head.loss if model.head.aux_head is not None else None)
    step = _TrainStep(model)
    if context.enabled:
        criterion.make_distributed(context.world_size)
        # backbones keep layers forward_features never uses (e.g. ConvNeXt's head norm): let DDP skip them
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=True)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    run_config = dataclasses.asdict(config)

    start_epoch, best_metric, history = 0, None, []
    if resume:
        saved = load_config(last_dir)
        diff = config_diff({k: v for k, v in run_config.items() if k not in ('progress', 'num_workers', 'device')},
                           {k: v for k, v in saved.get('train', {}).items()
                            if k not in ('progress', 'num_workers', 'device')})
        if diff:
            raise ValueError(f'cannot resume {out_dir}: the settings differ from the saved run: {"; ".join(diff)} '
                             f'(now != saved)')
        state = load_training_state(last_dir, map_location=device)
        load_model(model, str(resolve_dir(last_dir) / WEIGHTS_NAME), device=str(device))
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None:
            scheduler.load_state_dict(state['scheduler'])
        scaler.load_state_dict(state['scaler'])
        start_epoch, best_metric, history = state['epoch'] + 1, state['best_metric'], state['history']
        _logger.info('resuming %s at epoch %d', out_dir, start_epoch + 1)
    if context.is_main:
        (out_dir / 'train_config.json').write_text(json.dumps(run_config, indent=2, sort_keys=True) + '\n')

    dataset = ImageDataset(train_list, create_cgd_transform(data_config, True, config.img_size, config.resize_size),
                           skip_bad_images=skip_bad_images)
    ckpt_extra = dict(extra or {}, data=data_config, train=run_config, class_names=train_list.class_names)
    for epoch in range(start_epoch, config.epochs):
        seed_everything(config.seed * 100003 + epoch)  # epoch state is a function of (seed, epoch): exact resume
        loader = _loader(dataset, config, device, context)
        model.train()
        if config.freeze_bn:
            freeze_batch_norm(model.backbone)
        totals: Dict[str, torch.Tensor] = {}  # summed on the device: no host sync per step
        start, seen = time.time(), 0
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{config.epochs}', unit='batch', disable=not config.progress)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, dtype):
                embeddings, logits = step(images)
            loss = criterion(embeddings, labels, logits)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'non-finite loss {loss.item()} at epoch {epoch + 1}; parts '
                                         f'{ {k: float(v) for k, v in criterion.last_parts.items()} }. Lower lr or '
                                         f'use --amp none; the last checkpoint in {last_dir} is intact')
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            seen += len(labels)
            for key, value in criterion.last_parts.items():
                totals[key] = totals[key] + value if key in totals else value
            if config.progress and bar.n % 10 == 0:
                bar.set_postfix(loss=f'{float(criterion.last_parts["total"]):.4f}',
                                img_s=f'{seen / (time.time() - start):.1f}')
        steps, seconds = len(loader), time.time() - start
        row: Dict[str, Any] = {'epoch': epoch + 1, 'lr': optimizer.param_groups[0]['lr'], 'seconds': round(seconds, 2),
                               'images_per_s': round(seen / seconds, 2)}
        if config.head_lr is not None:
            row['head_lr'] = optimizer.param_groups[-1]['lr']
        row.update({f'loss_{k}': float(all_reduce_mean(v, context)) / steps for k, v in totals.items()})
        row['images_per_s'] = round(row['images_per_s'] * context.world_size, 2)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        if not context.is_main:  # rank 0 validates and writes; the others wait for it
            context.barrier()
            continue
        improved = False
        if val_list is not None and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
            metrics = validate(model, val_list, data_config, device, config.eval_batch_size, config.num_workers,
                               dtype, progress=False)
            row.update({f'val_{k}': v for k, v in metrics.items()})
            score = metrics[config.select_metric]
            improved = best_metric is None or score > best_metric
            best_metric = score if improved else best_metric
        elif val_list is None:
            improved = True  # nothing to select with: the latest model is the best we know
        history.append(row)
        # 4 significant digits, not 4 decimals: a learning rate of 5e-05 must not read as 0.0001
        _logger.info('epoch %d: %s', epoch + 1, {k: float(f'{v:.4g}') if isinstance(v, float) else v
                                                 for k, v in row.items()})
        if improved:
            save_pretrained(model, best_dir, extra=dict(ckpt_extra, epoch=epoch + 1, metrics=row))
        state = {'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict() if scheduler else None,
                 'scaler': scaler.state_dict(), 'epoch': epoch, 'best_metric': best_metric, 'history': history}
        save_pretrained(model, last_dir, extra=dict(ckpt_extra, epoch=epoch + 1, metrics=row), training_state=state)
        _append_jsonl(out_dir / 'metrics.jsonl', history)
        context.barrier()

    if not context.is_main:
        return TrainResult(model=model, best_dir=best_dir, last_dir=last_dir, history=history, best_metric=best_metric,
                           is_main=False)
    best = load_pretrained(best_dir, map_location=device) if resolve_dir(best_dir).exists() else model
    return TrainResult(model=best, best_dir=best_dir, last_dir=last_dir, history=history, best_metric=best_metric)
