"""The optimizer and learning-rate schedule a :class:`~cgd_heads.training.config.TrainConfig` describes."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from timm.scheduler import create_scheduler_v2

from ..models.cgd_model import CGDModel
from .config import TrainConfig

__all__ = ['make_optimizer', 'make_scheduler']


def make_optimizer(model: CGDModel, config: TrainConfig) -> torch.optim.Optimizer:
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """timm's epoch scheduler for ``config.sched`` (None for 'none'); 'step' drops x0.1 at 60% and 80% of the epochs."""
    if config.sched == 'none':
        return None
    if config.sched == 'step':
        milestones = sorted({max(1, round(config.epochs * f)) for f in (0.6, 0.8)})
        return create_scheduler_v2(optimizer, sched='multistep', num_epochs=config.epochs,
                                   decay_milestones=milestones, decay_rate=0.1, warmup_epochs=config.warmup_epochs,
                                   warmup_lr=config.lr * 0.01)[0]
    return create_scheduler_v2(optimizer, sched='cosine', num_epochs=config.epochs,
                               warmup_epochs=config.warmup_epochs, warmup_lr=config.lr * 0.01)[0]
