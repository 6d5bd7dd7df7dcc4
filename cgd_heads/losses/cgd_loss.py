"""CGD's training objective: batch-hard triplet ranking loss + the auxiliary classification loss."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, reducers

from ..utils.checks import check_float, check_labels

__all__ = ['CGDLoss']


class CGDLoss(nn.Module):
    """``L = ranking_weight * L_rank(embeddings) + aux_weight * L_cls(logits)``, as trained end to end in CGD.

    The default ranking loss is the batch-hard triplet loss with margin m on the combined descriptor: for every
    anchor a with at least one positive and one negative in the batch,
    ``l_a = max(0, max_p d(a, p) - min_n d(a, n) + m)``, d the Euclidean distance of the unit-norm embeddings,
    and ``L_rank = mean_a l_a`` over all such anchors, zero terms included. That is pytorch-metric-learning's
    ``TripletMarginLoss(margin)`` with ``BatchHardMiner`` and ``MeanReducer``; note PML's own defaults differ
    (margin 0.05, ``AvgNonZeroReducer`` averaging only the violating triplets).

    Args:
        margin: Triplet margin m, > 0 (CGD: 0.1). Ignored when ``metric_loss`` is given.
        metric_loss: Any PML loss called as ``metric_loss(embeddings, labels, indices_tuple)``; replaces the
            default triplet loss.
        miner: Any PML miner. Default: ``BatchHardMiner`` with the default loss, no miner with a custom
            ``metric_loss`` (pass one explicitly to mine for it).
        aux_weight: Weight of the classification term, >= 0.
        aux_loss: ``aux_loss(logits, labels) -> scalar``; default cross-entropy with ``label_smoothing``. Pass
            ``head.aux_head.loss`` so the head's own ``label_smoothing`` is the single source of truth.
        ranking_weight: Weight of the ranking term, >= 0 (0: classification only, an ablation of the paper).
        label_smoothing: Smoothing of the default cross-entropy, in [0, 1); None: CGD's 0.1. Not together with
            ``aux_loss`` (which brings its own).

    After each call ``last_parts`` holds the detached parts (``'ranking'``, ``'classification'``, ``'total'``)
    for logging.

    Example:
        >>> criterion = CGDLoss(margin=0.1)
        >>> loss = criterion(torch.nn.functional.normalize(torch.randn(8, 16)), torch.arange(4).repeat(2))
        >>> loss.ndim
        0
    """

    def __init__(
            self,
            margin: float = 0.1,
            metric_loss: Optional[nn.Module] = None,
            miner: Optional[nn.Module] = None,
            aux_weight: float = 1.0,
            aux_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
            ranking_weight: float = 1.0,
            label_smoothing: Optional[float] = None,
    ):
        super().__init__()
        check_float(margin, 'margin', minimum=0, above=True)  # CGD uses 0.1
        check_float(aux_weight, 'aux_weight', minimum=0)
        check_float(ranking_weight, 'ranking_weight', minimum=0)
        if label_smoothing is not None:
            if aux_loss is not None:  # two sources of the smoothing: the one used would be a silent choice
                raise ValueError('label_smoothing applies to the default cross-entropy only; with aux_loss given '
                                 '(e.g. head.aux_head.loss) leave it None')
            check_float(label_smoothing, 'label_smoothing', minimum=0, maximum=1, below=True)
        if metric_loss is not None and not callable(metric_loss):
            raise TypeError(f'metric_loss must be a pytorch-metric-learning loss, got {type(metric_loss).__name__}')
        if miner is not None and not callable(miner):
            raise TypeError(f'miner must be a pytorch-metric-learning miner, got {type(miner).__name__}')
        if aux_loss is not None and not callable(aux_loss):
            raise TypeError(f'aux_loss must be callable as aux_loss(logits, labels), got {type(aux_loss).__name__}')
        self.margin = float(margin)
        if metric_loss is None:
            metric_loss = losses.TripletMarginLoss(margin=self.margin, reducer=reducers.MeanReducer())
            miner = miners.BatchHardMiner() if miner is None else miner
        self.metric_loss = metric_loss
        self.miner = miner
        self.aux_weight = float(aux_weight)
        self.ranking_weight = float(ranking_weight)
        self.aux_loss = aux_loss
        self.label_smoothing = 0.1 if label_smoothing is None else float(label_smoothing)
        self.last_parts: Dict[str, torch.Tensor] = {}
        self._ranking_scale = 1.0

    def make_distributed(self, world_size: int) -> 'CGDLoss':
        """Mine and rank over the embeddings of all processes (call after ``init_process_group``).

        Wraps the metric loss and miner in pytorch-metric-learning's ``DistributedLossWrapper`` /
        ``DistributedMinerWrapper``: each rank gathers every rank's embeddings, so batch-hard mining sees the global
        batch. The wrapped loss is multiplied by the world size so that DDP's gradient averaging gives the
        single-process gradient; ``last_parts['ranking']`` reports the unscaled value.
        """
        from pytorch_metric_learning.utils import distributed as pml_dist
        self.metric_loss = pml_dist.DistributedLossWrapper(self.metric_loss)
        if self.miner is not None:
            self.miner = pml_dist.DistributedMinerWrapper(self.miner)
        self._ranking_scale = float(world_size)
        return self

    def forward(
            self,
            embeddings: torch.Tensor,
            labels: torch.Tensor,
            logits: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Total loss (a scalar tensor) of a batch.

        Args:
            embeddings: ``(N, D)`` embeddings.
            labels: ``(N,)`` integer class ids.
            logits: ``(N, num_classes)`` temperature-scaled logits of the auxiliary head, or None (ranking only).
        """
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f'embeddings must be a (N, D) tensor, got {type(embeddings).__name__}')
        if embeddings.ndim != 2:
            raise ValueError(f'embeddings must be a (N, D) tensor, got shape {tuple(embeddings.shape)}')
        check_labels(labels, embeddings.shape[0])
        # Mining and the triplet loss run in float32: under fp16 autocast the distances lose the margin's scale.
        embeddings = embeddings.float()
        indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
        ranking = self.metric_loss(embeddings, labels, indices_tuple)
        total = self.ranking_weight * ranking
        parts = {'ranking': ranking.detach() / self._ranking_scale}
        if logits is not None:
            if logits.ndim != 2 or logits.shape[0] != embeddings.shape[0]:
                raise ValueError(f'logits must have shape ({embeddings.shape[0]}, num_classes), '
                                 f'got {tuple(logits.shape)}')
            if self.aux_loss is not None:
                classification = self.aux_loss(logits.float(), labels)
            else:
                check_labels(labels, logits.shape[0], logits.shape[1])
                classification = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
            total = total + self.aux_weight * classification
            parts['classification'] = classification.detach()
        # the objective as a single process would report it (the distributed ranking term is scaled for DDP)
        parts['total'] = self.ranking_weight * parts['ranking'] + self.aux_weight * parts.get('classification', 0.0)
        self.last_parts = parts
        return total
