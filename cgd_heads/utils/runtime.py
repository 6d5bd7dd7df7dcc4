"""Device, precision and seeding choices shared by training, extraction and the CLIs."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import ContextManager, Optional, Union

import numpy as np
import torch

__all__ = ['resolve_device', 'amp_dtype', 'autocast', 'seed_everything', 'cpu_has_bf16', 'AMP_MODES']

AMP_MODES = ('auto', 'none', 'bf16', 'fp16')


def resolve_device(device: Union[str, torch.device, None] = 'auto') -> torch.device:
    """``'auto'`` (or None) picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {device!r}') from e
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device={str(device)!r} requested but CUDA is not available; use --device cpu or auto')
    return device


def amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` on ``device``: ``'auto'`` = bf16 on CUDA when supported, none on CPU."""
    if amp not in AMP_MODES:
        raise ValueError(f'amp must be one of {AMP_MODES}, got {amp!r}')
    if amp == 'none' or (amp == 'auto' and device.type != 'cuda'):
        return None
    if amp == 'auto':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == 'bf16' else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (also pytorch-metric-learning's samplers, which draw from ``np.random``) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


#: x86 flags of native bf16 arithmetic (/proc/cpuinfo): without them a bf16 autocast on the CPU converts to float32 and
#: back around every matmul, which is not expected to pay.
BF16_CPU_FLAGS = ('avx512_bf16', 'amx_bf16')


def cpu_has_bf16(cpuinfo: Union[str, Path] = '/proc/cpuinfo') -> bool:
    """Whether the CPU lists one of :data:`BF16_CPU_FLAGS` in ``cpuinfo`` (False where that file cannot be read)."""
    try:
        text = Path(cpuinfo).read_text(errors='replace')
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() == 'flags':
            flags.update(value.split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)
