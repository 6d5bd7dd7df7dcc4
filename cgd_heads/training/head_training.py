"""Train only the head on cached (frozen) backbone feature maps: the fast tier of the ablation benchmarks.

Same batches (m per class), loss (:class:`~cgd_heads.CGDLoss`) and heads as end-to-end training, minus the
backbone's gradient: what the auxiliary classifier does for the backbone is therefore not measured here, only what
the head configuration does with fixed features. Architectures (CGD paper, Figure 3):

* ``'cgd'``: :class:`~cgd_heads.CGDHead`, ranking loss on the combined descriptor.
* ``'concat_fc'`` (B): :class:`~cgd_heads.layers.variants.ConcatFCHead`, pooled vectors concatenated, one FC.
* ``'separate'`` (A): CGDHead's branches with one ranking loss per branch descriptor, summed; the retrieval
  embedding is still their normalised concatenation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional

import numpy as np
import torch
import torch.nn as nn
from pytorch_metric_learning.samplers import MPerClassSampler

from ..layers.heads import CGDHead
from ..layers.variants import ConcatFCHead
from ..losses.cgd_loss import CGDLoss
from ..models.cgd_model import HEAD_KWARGS
from ..utils.runtime import seed_everything
from ..utils.settings import setting, with_default
from .config import HeadSettings

__all__ = ['HeadTrainConfig', 'build_head', 'train_head', 'embed_features', 'ARCHITECTURES']

ARCHITECTURES = ('cgd', 'concat_fc', 'separate')


@dataclass
class HeadTrainConfig(HeadSettings):
    """Head and optimisation settings of one fast-tier run (the shared fields as in :class:`HeadSettings`)."""
    embed_dim: int = with_default(HeadSettings, 'embed_dim', 512)
    lr: float = with_default(HeadSettings, 'lr', 1e-3)
    architecture: str = setting('cgd', "'cgd', 'concat_fc' (B) or 'separate' (A), see the module docstring",
                                choices=ARCHITECTURES)

    #: the features are pooled once before training (not a field: a property of the trainer)
    pools_once: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f'architecture must be one of {ARCHITECTURES}, got {self.architecture!r}')
        if self.learnable_p and self.pools_once:  # train_head pools the frozen maps once: p would stay put
            raise ValueError('learnable_p=True cannot be trained on cached features (they are pooled once with a '
                             'fixed p); learn p end to end with train(), or fix gem_p')


def build_head(config: HeadTrainConfig, in_features: int, num_classes: int, input_fmt: str = 'NCHW',
               num_prefix_tokens: int = 0) -> nn.Module:
    """The head a config describes; the classifier exists only when ``aux_weight > 0``."""
    classes = num_classes if config.aux_weight > 0 else 0
    if config.architecture == 'concat_fc':
        return ConcatFCHead(in_features, config.descriptors, config.embed_dim, gem_p=config.gem_p,
                            num_classes=classes, temperature=config.temperature,
                            label_smoothing=config.label_smoothing, input_fmt=input_fmt,
                            num_prefix_tokens=num_prefix_tokens)
    return CGDHead(in_features, config.descriptors, config.embed_dim, num_classes=classes, input_fmt=input_fmt,
                   num_prefix_tokens=num_prefix_tokens, **{name: getattr(config, name) for name in HEAD_KWARGS})


def train_head(
        config: HeadTrainConfig,
        features: torch.Tensor,
        labels: torch.Tensor,
        input_fmt: str = 'NCHW',
        num_prefix_tokens: int = 0,
) -> nn.Module:
    """Train a head on ``features`` (N, ...) with class ids ``labels`` (N,) in [0, C); returns it in eval mode.

    ``num_prefix_tokens``: leading tokens (class, register) of ``'NLC'`` features left out of pooling, as the
    backbone's ``num_prefix_tokens``."""
    if len(features) != len(labels):
        raise ValueError(f'features and labels must have the same length, got {len(features)} and {len(labels)}')
    seed_everything(config.seed)
    num_classes = check_batch(config, labels)
    channels = features.shape[1] if input_fmt == 'NCHW' else features.shape[-1]
    head = build_head(config, channels, num_classes, input_fmt, num_prefix_tokens)
    aux = getattr(head, 'aux_head', None)
    criterion = CGDLoss(margin=config.margin, aux_weight=config.aux_weight, ranking_weight=config.ranking_weight,
                        aux_loss=aux.loss if aux is not None else None)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    steps = max(1, len(labels) // config.batch_size)
    # Fixed-p pooling of frozen features is the same every epoch: pool once, train the projections on the vectors
    # (exactly what pooling every batch would compute, ~100x cheaper than re-pooling the maps).
    with torch.no_grad():
        pooled = [torch.cat(parts) for parts in zip(*(head.pool(chunk.float()) for chunk in features.split(512)))]
    head.train()
    for epoch in range(config.epochs):
        for batch in epoch_batches(labels, config, epoch, steps):
            loss = pooled_loss(head, criterion, config.architecture, [p[batch] for p in pooled], labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    return head.eval()


def check_batch(config: HeadSettings, labels: torch.Tensor) -> int:
    """The classifier's class count (largest label + 1); ValueError when m-per-class batches of ``config`` cannot be
    drawn from the classes present in ``labels`` (ids missing from them count for the classifier, not the sampler)."""
    present = int(torch.unique(labels).numel())
    if present * config.m_per_class < config.batch_size or config.batch_size % config.m_per_class:
        raise ValueError(f'batch_size={config.batch_size} must be a multiple of m_per_class={config.m_per_class} and '
                         f'at most (classes present) * m_per_class = {present} * {config.m_per_class}')
    return int(labels.max()) + 1


def epoch_batches(labels: torch.Tensor, config: HeadSettings, epoch: int, steps: int) -> List[torch.Tensor]:
    """The ``steps`` m-per-class batches (index tensors) of one epoch, drawn from a seed of (config.seed, epoch)."""
    seed_everything(config.seed * 100003 + epoch)
    sampler = MPerClassSampler(labels.numpy(), m=config.m_per_class, batch_size=config.batch_size,
                               length_before_new_iter=steps * config.batch_size)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    return list(torch.from_numpy(order).split(config.batch_size))


def pooled_loss(head: nn.Module, criterion: CGDLoss, architecture: str, pooled: List[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
    """The training loss of a head on pooled vectors: one ranking loss on the combined embedding (CGD, B), or one
    per branch descriptor, summed (A, ``'separate'``); the classifier's loss on the first descriptor either way."""
    if architecture == 'separate':
        logits = head.aux_head(pooled[0]) if head.aux_head is not None else None
        return sum(criterion(b, labels, logits if i == 0 else None) for i, b in enumerate(head.project(pooled)))
    embeddings, logits = head.forward_pooled(pooled)
    return criterion(embeddings, labels, logits)


@torch.no_grad()
def embed_features(head: nn.Module, features: torch.Tensor, batch_size: int = 512,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Embeddings ``head(features)`` in batches, float32 on the CPU."""
    head.eval()
    out = [head(chunk.to(device or 'cpu').float()).cpu() for chunk in features.split(batch_size)]
    return torch.cat(out)
