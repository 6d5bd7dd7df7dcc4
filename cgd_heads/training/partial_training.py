"""Partial fine-tuning on cached trunk maps: the last stage(s) of the backbone and the head are trained, the early
stages stay frozen and run once per image (the benchmarks' partial tier).

Between the fast tier (:func:`train_head`, nothing of the backbone adapts) and end-to-end training (:func:`train`,
the CPU cannot afford many rows of it): the auxiliary classifier's gradient reaches the shared tail here, so the
loss and training-trick ablations are measurable, at a fraction of a full step's cost. What it gives up: image
augmentation (the maps are cached from the evaluation transform; ``flip`` mirrors each cached map with probability
1/2 instead, an approximation of flipping the image) and adaptation of the frozen stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from ..losses.cgd_loss import CGDLoss
from ..utils.runtime import seed_everything
from ..utils.settings import setting
from .head_training import HeadTrainConfig, build_head, check_batch, epoch_batches, pooled_loss
from .trainer import freeze_batch_norm

__all__ = ['PartialTrainConfig', 'train_partial']


@dataclass
class PartialTrainConfig(HeadTrainConfig):
    """Settings of one partial fine-tuning run: those of :class:`HeadTrainConfig` (``lr`` is the tail's rate) and
    what the trainable tail adds."""
    head_lr: Optional[float] = setting(None, 'learning rate of the head (default: lr)')
    freeze_bn: bool = setting(True, "keep the tail's BatchNorm statistics at their pretrained values")
    flip: bool = setting(True, 'mirror each cached map with probability 1/2 (a horizontal flip, approximated on maps)')
    pools_once: ClassVar[bool] = False  # pooled every step: a learnable p trains

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_lr is not None and not self.head_lr > 0:
            raise ValueError(f'head_lr must be > 0 or None (= lr), got {self.head_lr!r}')
        if self.learnable_p and self.architecture == 'concat_fc':
            raise ValueError("learnable_p=True needs architecture 'cgd' or 'separate' (ConcatFCHead pools with a "
                             'fixed p)')


def train_partial(
        config: PartialTrainConfig,
        tail: nn.Module,
        features: torch.Tensor,
        labels: torch.Tensor,
        input_fmt: str = 'NCHW',
) -> nn.Sequential:
    """Train ``tail`` (in place) and a new head on cached trunk maps.

    Each step draws an m-per-class batch of maps ``x``, mirrors each along its width with probability 1/2 when
    ``config.flip``, and minimises :class:`~cgd_heads.CGDLoss` of ``head(tail(x))`` (ranking_weight x batch-hard
    triplet + aux_weight x the classifier's cross-entropy); Adam with ``config.lr`` on the tail and
    ``config.head_lr`` on the head, cosine schedule over the epochs.

    Args:
        config: The run's settings.
        tail: The trainable half of :func:`cgd_heads.models.split_backbone` (pretrained weights).
        features: Trunk maps of the training images, (N, C, H, W) or (N, H, W, C) as ``input_fmt`` says, any float
            dtype.
        labels: Class ids (N,) in [0, C).
        input_fmt: Layout of the trunk's maps and the tail's output, 'NCHW' or 'NHWC' (the head's ``input_fmt``).

    Returns:
        ``nn.Sequential(tail, head)`` in eval mode: embeddings of trunk maps.
    """
    if input_fmt not in ('NCHW', 'NHWC'):
        raise ValueError(f"input_fmt must be 'NCHW' or 'NHWC', got {input_fmt!r}")
    if features.ndim != 4:
        layout = ', '.join(input_fmt[1:])
        raise ValueError(f'features must be trunk maps (N, {layout}), got shape {tuple(features.shape)}')
    if len(features) != len(labels):
        raise ValueError(f'features and labels must have one row per image, got {len(features)} and {len(labels)}')
    trainable = [p for p in tail.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError('tail has no parameter with requires_grad=True: nothing of the backbone would train (use '
                         'train_head for a frozen backbone)')
    seed_everything(config.seed)
    num_classes = check_batch(config, labels)
    tail.eval()
    with torch.no_grad():
        out = tail(features[:1].float())
    channels = out.shape[1] if input_fmt == 'NCHW' else out.shape[-1]
    head = build_head(config, channels, num_classes, input_fmt)
    aux = getattr(head, 'aux_head', None)
    criterion = CGDLoss(margin=config.margin, aux_weight=config.aux_weight, ranking_weight=config.ranking_weight,
                        aux_loss=aux.loss if aux is not None else None)
    optimizer = torch.optim.Adam([{'params': trainable, 'lr': config.lr},
                                  {'params': head.parameters(), 'lr': config.head_lr or config.lr}])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    steps = max(1, len(labels) // config.batch_size)
    model = nn.Sequential(tail, head)
    width = 3 if input_fmt == 'NCHW' else 2
    try:
        for epoch in range(config.epochs):
            model.train()
            if config.freeze_bn:
                freeze_batch_norm(tail)
            for batch in epoch_batches(labels, config, epoch, steps):
                x = features[batch].float()
                if config.flip:
                    mirror = torch.rand(len(batch)) < 0.5
                    x = torch.where(mirror[:, None, None, None], x.flip(width), x)
                loss = pooled_loss(head, criterion, config.architecture, head.pool(tail(x)), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            scheduler.step()
    finally:  # an interrupted run does not leave the caller's tail in train mode
        model.eval()
    return model
