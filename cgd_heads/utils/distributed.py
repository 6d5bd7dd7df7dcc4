"""Where this process stands under ``torchrun``: the process group, its rank, and rank-0 helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ['DistributedContext', 'init_distributed', 'all_reduce_mean']


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and validates."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1); else single process.

    The backend is NCCL on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return DistributedContext()
    if not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0')))


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean of a tensor over all ranks (for logging); the tensor itself when single-process."""
    if not context.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / context.world_size
