"""Device, precision and seeding choices shared by training, extraction and the CLIs."""
from __future__ import annotations

import contextlib
import random
from typing import ContextManager, Optional, Union

import numpy as np
import torch

__all__ = ['resolve_device', 'amp_dtype', 'autocast', 'seed_everything', 'AMP_MODES']

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
