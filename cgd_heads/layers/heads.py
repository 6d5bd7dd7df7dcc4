"""The CGD main module (several global descriptors, concatenated) and its auxiliary softmax classifier.

Jun, Ko, Kim, Kim, Kim, "Combination of Multiple Global Descriptors for Image Retrieval", arXiv 1903.10663.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.checks import check_bool, check_float, check_int, check_labels
from .pooling import INPUT_FORMATS, GeneralizedPooling, check_p

__all__ = ['CGDHead', 'AuxSoftmaxHead', 'DESCRIPTOR_LETTERS', 'COMBINE_MODES', 'parse_descriptors', 'prepare_features']

#: Letter -> (name, fixed p). 'G' takes its p from ``gem_p``.
DESCRIPTOR_LETTERS = {'S': ('SPoC', 1.0), 'M': ('MAC', math.inf), 'G': ('GeM', None)}
COMBINE_MODES = ('concat', 'sum')


def parse_descriptors(descriptors: str) -> str:
    """Validate a descriptor configuration such as ``'SG'`` or ``'SMG'`` and return it.

    Letters: S = SPoC (p = 1), M = MAC (p = inf), G = GeM (p = ``gem_p``); upper case, each at most once (a
    repeated letter would be a second copy of the same pooling), order significant (the first one feeds the
    auxiliary classifier).
    """
    if not isinstance(descriptors, str):
        raise TypeError(f'descriptors must be a string of the letters S, M, G such as "SG", got '
                        f'{type(descriptors).__name__} {descriptors!r}')
    if not descriptors:
        raise ValueError('descriptors must name at least one descriptor: letters S (SPoC), M (MAC), G (GeM), '
                         'e.g. "SG" or "SMG"')
    unknown = sorted({c for c in descriptors if c not in DESCRIPTOR_LETTERS})
    if unknown:
        hint = f' (upper case: {descriptors.upper()!r})' if descriptors.upper() != descriptors else ''
        raise ValueError(f'descriptors={descriptors!r} has unknown letters {unknown}; valid letters are '
                         f'S (SPoC), M (MAC), G (GeM){hint}')
    if len(set(descriptors)) != len(descriptors):
        raise ValueError(f'descriptors={descriptors!r} repeats a letter; each of S, M, G may appear once')
    return descriptors


class AuxSoftmaxHead(nn.Module):
    """CGD's auxiliary classifier: BatchNorm1d + Linear on the first descriptor, with temperature scaling.

    ``logits = (W BN(f) + b) / tau``; the loss is cross-entropy with label smoothing eps:
    ``L = (1 - eps) * NLL(softmax(logits), y) + eps * mean_k(-log softmax(logits)_k)``.
    tau < 1 enlarges the gradients of hard examples (CGD uses 0.5 in public recipes); eps = 0.1.

    Args:
        in_features: Size of the pooled first descriptor (the backbone's channel count).
        num_classes: Number of training classes, > 0.
        temperature: tau > 0.
        label_smoothing: eps in [0, 1).
    """

    def __init__(self, in_features: int, num_classes: int, temperature: float = 0.5, label_smoothing: float = 0.1):
        super().__init__()
        check_int(in_features, 'in_features')
        check_int(num_classes, 'num_classes')
        self.check_loss_args(temperature, label_smoothing)
        self.in_features = in_features
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.norm = nn.BatchNorm1d(in_features)
        self.fc = nn.Linear(in_features, num_classes)

    @staticmethod
    def check_loss_args(temperature: float, label_smoothing: float) -> None:
        """Raise TypeError unless both are numbers, ValueError unless temperature > 0 and 0 <= label_smoothing < 1."""
        check_float(temperature, 'temperature', minimum=0, above=True)  # CGD uses 0.5; 1 disables it
        check_float(label_smoothing, 'label_smoothing', minimum=0, maximum=1, below=True)  # CGD: 0.1; 0 disables it

    def extra_repr(self) -> str:
        """The settings ``print(module)`` shows: temperature and label smoothing."""
        return f'temperature={self.temperature}, label_smoothing={self.label_smoothing}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled logits ``(N, num_classes)`` of the pooled first descriptor ``x`` ``(N, in_features)``."""
        return self.fc(self.norm(x)) / self.temperature

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy (torch's own ``label_smoothing``) of temperature-scaled logits."""
        check_labels(labels, logits.shape[0], self.num_classes)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def check_input_format(input_fmt: str, num_prefix_tokens: int) -> None:
    """ValueError unless ``input_fmt`` is one of :data:`INPUT_FORMATS` and prefix tokens come with token inputs."""
    check_int(num_prefix_tokens, 'num_prefix_tokens', minimum=0)
    if input_fmt not in INPUT_FORMATS:
        raise ValueError(f'input_fmt must be one of {INPUT_FORMATS}, got {input_fmt!r}')
    if num_prefix_tokens and input_fmt != 'NLC':
        raise ValueError(f'num_prefix_tokens={num_prefix_tokens} only applies to token inputs '
                         f'(input_fmt="NLC"), got input_fmt={input_fmt!r}')


def prepare_features(x: torch.Tensor, in_features: int, input_fmt: str, num_prefix_tokens: int = 0,
                     owner: str = 'CGDHead') -> torch.Tensor:
    """Check a feature map against the head's configuration and drop the prefix tokens of an NLC sequence.

    A wrong layout gets a message naming the expected one instead of a matmul shape error later.
    """
    channel_dim = 1 if input_fmt == 'NCHW' else -1
    expected_ndim = 3 if input_fmt == 'NLC' else 4
    if x.ndim != expected_ndim or x.shape[channel_dim] != in_features:
        layout = '(N, L, C)' if input_fmt == 'NLC' else f'{input_fmt} (N, {", ".join(input_fmt[1:])})'
        raise ValueError(f'{owner}(in_features={in_features}, input_fmt={input_fmt!r}) expects {layout} features '
                         f'with C={in_features}, got shape {tuple(x.shape)}')
    if not x.is_floating_point():
        raise TypeError(f'{owner} expects floating point features, got dtype {x.dtype}')
    if num_prefix_tokens:
        if x.shape[1] <= num_prefix_tokens:
            raise ValueError(f'got {x.shape[1]} tokens but num_prefix_tokens={num_prefix_tokens}: '
                             f'no patch tokens left to pool')
        x = x[:, num_prefix_tokens:]
    return x


class CGDHead(nn.Module):
    """Combination of multiple Global Descriptors on one backbone feature map.

    For each letter i of ``descriptors`` (S = SPoC, M = MAC, G = GeM):
    ``phi_i = normalize(W_i pool_i(X))`` with ``W_i`` a bias-free Linear ``in_features -> embed_dim / n``;
    the embedding is ``normalize(concat_i phi_i)`` (``combine='sum'``: each ``W_i`` maps to ``embed_dim`` and
    ``normalize(sum_i phi_i)``). With ``num_classes > 0`` an :class:`AuxSoftmaxHead` classifies
    ``pool_0(X)``, the pooled vector of the FIRST letter (before its FC), as in the paper.

    Args:
        in_features: Channel count C of the backbone's feature map (timm's ``num_features``).
        descriptors: Letters of the global descriptors in order, e.g. ``'SG'``, ``'SMG'``.
        embed_dim: Size of the combined embedding; divisible by the number of descriptors with ``'concat'``.
        combine: ``'concat'`` (CGD) or ``'sum'``.
        gem_p: p of the GeM branch (G).
        learnable_p: Learn GeM's p.
        num_classes: Classes of the auxiliary classifier; 0 = no classifier.
        temperature: Softmax temperature tau of the classifier.
        label_smoothing: Label smoothing eps of the classifier's loss.
        input_fmt: Layout of the features: ``'NCHW'``, ``'NHWC'`` or ``'NLC'`` (tokens).
        num_prefix_tokens: Leading tokens (class / register / distillation) excluded from pooling (``'NLC'``).

    Example:
        >>> head = CGDHead(512, descriptors='SG', embed_dim=256, num_classes=10)
        >>> head(torch.randn(4, 512, 14, 14)).shape
        torch.Size([4, 256])
    """

    def __init__(
            self,
            in_features: int,
            descriptors: str = 'SG',
            embed_dim: int = 1536,
            combine: str = 'concat',
            gem_p: float = 3.0,
            learnable_p: bool = False,
            num_classes: int = 0,
            temperature: float = 0.5,
            label_smoothing: float = 0.1,
            input_fmt: str = 'NCHW',
            num_prefix_tokens: int = 0,
    ):
        super().__init__()
        check_int(in_features, 'in_features')
        descriptors = parse_descriptors(descriptors)
        check_int(embed_dim, 'embed_dim')
        check_int(num_classes, 'num_classes', minimum=0)
        learnable_p = check_bool(learnable_p, 'learnable_p')
        # named here as the head's arguments (the G branch's pooling would call them p / learnable); checked
        # also without G, so a typo does not wait for the day G is added
        gem_p = check_p(gem_p, learnable_p and 'G' in descriptors, 'gem_p')
        if combine not in COMBINE_MODES:
            raise ValueError(f'combine must be one of {COMBINE_MODES}, got {combine!r}')
        check_input_format(input_fmt, num_prefix_tokens)
        n = len(descriptors)
        if combine == 'concat' and embed_dim % n:
            lower = embed_dim - embed_dim % n
            choices = ' or '.join(str(c) for c in (lower, lower + n) if c > 0)
            raise ValueError(f'embed_dim={embed_dim} is not divisible by the {n} descriptors of '
                             f'{descriptors!r}; use a multiple of {n} such as {choices}')
        AuxSoftmaxHead.check_loss_args(temperature, label_smoothing)

        self.in_features = in_features
        self.descriptors = descriptors
        self.embed_dim = embed_dim
        self.combine = combine
        self.input_fmt = input_fmt
        self.num_prefix_tokens = num_prefix_tokens
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.branch_dim = embed_dim // n if combine == 'concat' else embed_dim
        self.pools = nn.ModuleList([
            GeneralizedPooling(
                p=gem_p if letter == 'G' else DESCRIPTOR_LETTERS[letter][1],
                learnable=learnable_p and letter == 'G',
                input_fmt=input_fmt,
            )
            for letter in descriptors
        ])
        self.fcs = nn.ModuleList([nn.Linear(in_features, self.branch_dim, bias=False) for _ in descriptors])
        self.aux_head: Optional[AuxSoftmaxHead] = None
        self.reset_classifier(num_classes)

    @property
    def num_classes(self) -> int:
        """Classes of the auxiliary classifier; 0 when the head has none."""
        return 0 if self.aux_head is None else self.aux_head.num_classes

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the auxiliary classifier by a fresh one for ``num_classes`` classes (0 removes it)."""
        check_int(num_classes, 'num_classes', minimum=0)
        self.aux_head = AuxSoftmaxHead(
            self.in_features, num_classes, self.temperature, self.label_smoothing) if num_classes else None

    def extra_repr(self) -> str:
        """The settings ``print(module)`` shows: sizes, descriptor letters, combination and input format."""
        return (f'in_features={self.in_features}, descriptors={self.descriptors!r}, embed_dim={self.embed_dim}, '
                f'combine={self.combine!r}, input_fmt={self.input_fmt!r}')

    def pool(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The pooled vectors ``pool_i(X)``, one ``(N, in_features)`` tensor per descriptor letter."""
        x = prepare_features(x, self.in_features, self.input_fmt, self.num_prefix_tokens, type(self).__name__)
        return [pool(x) for pool in self.pools]

    def project(self, pooled: List[torch.Tensor]) -> List[torch.Tensor]:
        """The normalised branch descriptors ``phi_i = normalize(W_i pool_i(X))`` from the pooled vectors."""
        return [F.normalize(fc(v), dim=-1) for fc, v in zip(self.fcs, pooled)]

    def forward_branches(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per-branch outputs: the pooled vectors ``pool_i(X)`` and the normalised descriptors ``phi_i``."""
        pooled = self.pool(x)
        return pooled, self.project(pooled)

    def combine_branches(self, branch_descriptors: List[torch.Tensor]) -> torch.Tensor:
        """The embedding: ``normalize(concat_i phi_i)`` (or of their sum)."""
        if self.combine == 'concat':
            combined = torch.cat(branch_descriptors, dim=-1)
        else:
            combined = torch.stack(branch_descriptors, dim=0).sum(dim=0)
        return F.normalize(combined, dim=-1)

    def forward_pooled(self, pooled: List[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``forward_train`` from pooled vectors (fixed-p pooling can be computed once for frozen features)."""
        logits = self.aux_head(pooled[0]) if self.aux_head is not None else None
        return self.combine_branches(self.project(pooled)), logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the unit-norm embedding ``(N, embed_dim)``; never computes the classifier."""
        return self.combine_branches(self.forward_branches(x)[1])

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(embedding, logits)``; ``logits`` is None when the head has no classifier."""
        return self.forward_pooled(self.pool(x))
