"""The alternative head the CGD paper compares against (its Figure 3, architecture B).

* Architecture A: CGD's branches, but a separate ranking loss on every branch descriptor (no combined loss). It is
  :class:`~cgd_heads.CGDHead` trained differently: see ``architecture='separate'`` in
  :mod:`cgd_heads.training.head_training`.
* Architecture B (this module): the pooled vectors are concatenated first and ONE FC maps them to the embedding,
  ``normalize(W [pool_1(X); ...; pool_n(X)])``, which mixes the descriptors' properties before the ranking loss.
* CGD: one FC per descriptor, normalised, then concatenated (:class:`~cgd_heads.CGDHead`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.checks import check_int
from .heads import DESCRIPTOR_LETTERS, AuxSoftmaxHead, check_input_format, parse_descriptors, prepare_features
from .pooling import GeneralizedPooling

__all__ = ['ConcatFCHead']


class ConcatFCHead(nn.Module):
    """Architecture B: ``embedding = normalize(W concat_i pool_i(X))`` with one ``Linear(n * C, embed_dim)``.

    The same descriptors, ``gem_p``, input formats (``num_prefix_tokens`` included) and auxiliary classifier (on
    ``pool_0(X)``) as :class:`~cgd_heads.CGDHead`, so the two differ only where the paper says they do; there is no
    ``combine`` (one FC over the concatenation is what B is) and no ``learnable_p``.
    """

    def __init__(
            self,
            in_features: int,
            descriptors: str = 'SG',
            embed_dim: int = 1536,
            gem_p: float = 3.0,
            num_classes: int = 0,
            temperature: float = 0.5,
            label_smoothing: float = 0.1,
            input_fmt: str = 'NCHW',
            num_prefix_tokens: int = 0,
    ):
        super().__init__()
        check_int(in_features, 'in_features')
        check_int(embed_dim, 'embed_dim')
        check_int(num_classes, 'num_classes', minimum=0)
        check_input_format(input_fmt, num_prefix_tokens)
        AuxSoftmaxHead.check_loss_args(temperature, label_smoothing)
        self.in_features = in_features
        self.descriptors = parse_descriptors(descriptors)
        self.embed_dim = embed_dim
        self.input_fmt = input_fmt
        self.num_prefix_tokens = num_prefix_tokens
        self.pools = nn.ModuleList([
            GeneralizedPooling(p=gem_p if c == 'G' else DESCRIPTOR_LETTERS[c][1], input_fmt=input_fmt)
            for c in self.descriptors])
        self.fc = nn.Linear(len(self.descriptors) * in_features, embed_dim, bias=False)
        self.aux_head: Optional[AuxSoftmaxHead] = (
            AuxSoftmaxHead(in_features, num_classes, temperature, label_smoothing) if num_classes else None)

    def pool(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The pooled vectors ``pool_i(X)``, as :meth:`cgd_heads.CGDHead.pool`."""
        x = prepare_features(x, self.in_features, self.input_fmt, self.num_prefix_tokens, type(self).__name__)
        return [pool(x) for pool in self.pools]

    def embed_pooled(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """The unit-norm embedding ``normalize(W concat_i pool_i(X))`` ``(N, embed_dim)`` from pooled vectors."""
        return F.normalize(self.fc(torch.cat(pooled, dim=-1)), dim=-1)

    def forward_pooled(self, pooled: List[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``forward_train`` from pooled vectors: ``(embedding, logits)``, logits None without a classifier."""
        return self.embed_pooled(pooled), self.aux_head(pooled[0]) if self.aux_head is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the unit-norm embedding ``(N, embed_dim)``; never computes the classifier."""
        return self.embed_pooled(self.pool(x))

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return ``(embedding, logits)``; ``logits`` is None when the head has no classifier."""
        return self.forward_pooled(self.pool(x))
