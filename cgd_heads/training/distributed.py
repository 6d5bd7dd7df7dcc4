"""Multi-process training under ``torchrun``: every rank's share of the global m-per-class batches.

Batch-hard mining needs to see the whole batch: every rank's embeddings are gathered before mining and the loss is
computed on the global batch (pytorch-metric-learning's ``DistributedLossWrapper`` / ``DistributedMinerWrapper``,
see :meth:`cgd_heads.CGDLoss.make_distributed`), so N processes with batch B / N each train like one process with
batch B. The process group itself is :mod:`cgd_heads.utils.distributed`.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence

from pytorch_metric_learning.samplers import MPerClassSampler
from torch.utils.data import Sampler

__all__ = ['DistributedMPerClassSampler']


class DistributedMPerClassSampler(Sampler[int]):
    """Every rank draws the same global m-per-class order and takes its own slice of each global batch.

    With identical seeds on all ranks (the training loop re-seeds every epoch), global batch ``b`` is exactly the
    batch a single process would get; rank ``r`` of ``W`` yields its items ``r * B/W .. (r + 1) * B/W - 1``.

    Args:
        labels: Class id of every dataset item.
        m: Images per class in a global batch.
        batch_size: Global batch size B, divisible by m and by the world size.
        length_before_new_iter: Items per epoch over all ranks (a multiple of B).
        rank, world_size: This process and the number of processes.
    """

    def __init__(self, labels: Sequence[int], m: int, batch_size: int, length_before_new_iter: int, rank: int,
                 world_size: int):
        if batch_size % world_size:
            raise ValueError(f'batch_size={batch_size} must be divisible by the {world_size} processes')
        self.inner = MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=length_before_new_iter)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __len__(self) -> int:
        return len(self.inner) // self.world_size

    def __iter__(self) -> Iterator[int]:
        order: List[int] = list(iter(self.inner))
        share = self.batch_size // self.world_size
        for start in range(0, len(order), self.batch_size):
            yield from order[start + self.rank * share:start + (self.rank + 1) * share]
