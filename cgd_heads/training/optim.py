"""The optimizer and learning-rate schedule a :class:`~cgd_heads.training.config.TrainConfig` describes."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

from ..models.cgd_model import CGDModel
from .config import TrainConfig

__all__ = ['make_optimizer', 'make_scheduler', 'step_milestones', 'describe_schedule']

#: The step schedule's drops (x0.1 each), as fractions of the run's optimizer updates.
STEP_FRACTIONS = (0.6, 0.8)


def make_optimizer(model: CGDModel, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters, one group at ``lr``; with ``head_lr``, group 0 is the backbone
    at ``lr`` and group 1 the head at ``head_lr``.

    With ``weight_decay > 0`` the parameters ``model.no_weight_decay()`` names (GeM's learnable p, the backbone's
    own list such as ViT's position embeddings) go into a group of their own after each of those, with
    ``weight_decay=0``: decaying p would pull it below 1, where its clamp stops every gradient and leaves SPoC.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parts: List[List[Tuple[str, torch.nn.Parameter]]] = [trainable]
    rates: List[Optional[float]] = [None]
    if config.head_lr is not None:  # one group otherwise: optimizer states saved before head_lr existed still load
        head = {id(p) for p in model.head.parameters()}
        parts = [[(n, p) for n, p in trainable if id(p) not in head], [(n, p) for n, p in trainable if id(p) in head]]
        rates = [None, config.head_lr]
    # without decay the layout stays one group per learning rate, the layout of states saved before this split
    no_decay = set(getattr(model, 'no_weight_decay', set)()) if config.weight_decay > 0 else set()
    groups: List[Dict[str, Any]] = []
    for part, lr in zip(parts, rates):
        for decayed in (True, False):
            params = [p for n, p in part if (n not in no_decay) == decayed]
            if params:  # an empty group would only confuse the schedulers
                groups.append({'params': params, **({} if lr is None else {'lr': lr}),
                               **({} if decayed else {'weight_decay': 0.0})})
    if config.optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    cls = torch.optim.AdamW if config.optimizer == 'adamw' else torch.optim.Adam
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay)


def step_milestones(total_updates: int) -> List[int]:
    """Updates after which the step schedule multiplies the learning rate by 0.1: ``round(f * total_updates)``
    for f in 0.6, 0.8 (at least update 1, duplicates merged)."""
    return sorted({max(1, round(total_updates * f)) for f in STEP_FRACTIONS})


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, iters_per_epoch: int) -> Optional[Any]:
    """timm's scheduler for ``config.sched``, stepped per optimizer update (``step_update``); None for 'none'
    without warm-up.

    The schedule is laid out over ``epochs * iters_per_epoch`` updates, so a drop or the cosine's descent that falls
    inside an epoch applies there: with 2 epochs, 'step' trains 60% of the updates at ``lr``, 20% at ``lr / 10``
    and 20% at ``lr / 100`` (an epoch-stepped schedule would round both drops to the end of epoch 1 and spend the
    whole second epoch at ``lr / 100``). Warm-up rises linearly from ``lr / 100`` over ``warmup_epochs`` epochs.
    """
    if config.sched == 'none' and not config.warmup_epochs:
        return None
    total = config.epochs * iters_per_epoch
    # warmup_prefix=False: the step milestones count from update 0 like the cosine's, warm-up included, so the drops
    # land where describe_schedule says (timm's default would shift them by the warm-up's length)
    warmup = dict(warmup_t=config.warmup_epochs * iters_per_epoch, warmup_lr_init=config.lr * 0.01,
                  t_in_epochs=False)
    if config.sched == 'cosine':
        return CosineLRScheduler(optimizer, t_initial=total, lr_min=0.0, **warmup)
    # 'step', or 'none' with a warm-up (no milestones: constant after it). timm applies milestone m from
    # step_update(m - 1) on, i.e. to update m; ours drop AFTER update m
    milestones = step_milestones(total) if config.sched == 'step' else []
    return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in milestones], decay_rate=0.1, warmup_prefix=False,
                                **warmup)


def describe_schedule(config: TrainConfig, iters_per_epoch: int) -> str:
    """One line saying what the learning rate will do over the run, in updates and epochs."""
    total = config.epochs * iters_per_epoch
    lrs = f'lr {config.lr:g}' + (f', head_lr {config.head_lr:g}' if config.head_lr is not None else '')
    text = f'{config.epochs} epochs x {iters_per_epoch} updates = {total} updates; {lrs}'
    if config.warmup_epochs:
        text += f'; linear warm-up from lr/100 over {config.warmup_epochs * iters_per_epoch} updates'
    if config.sched == 'none':
        return text + '; constant (--sched none)'
    if config.sched == 'cosine':
        return text + f'; cosine decay to 0 at update {total} (--sched cosine)'
    drops = ', '.join(f'update {m} (epoch {m / iters_per_epoch:.2f})' for m in step_milestones(total))
    return text + f'; x0.1 after {drops} (--sched step)'
