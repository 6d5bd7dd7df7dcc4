"""Embedding extraction in batches, with optional flip and multi-scale test-time averaging."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..utils.atomic import atomic_path
from ..utils.checks import PathLike, check_bool, check_float
from ..utils.runtime import autocast, resolve_device

__all__ = ['extract_embeddings', 'save_embeddings', 'load_embeddings', 'check_views']


def check_views(flip: Any, scales: Any) -> Tuple[bool, Tuple[float, ...]]:
    """``(flip, scales)`` checked: a bool, and a non-empty sequence of finite reals > 0 (as floats).

    Raises:
        TypeError: ``flip`` is not a bool, ``scales`` not a sequence of numbers.
        ValueError: ``scales`` is empty or holds a value <= 0 or not finite.
    """
    flip = check_bool(flip, 'flip')
    if isinstance(scales, np.ndarray) and scales.ndim == 1:
        scales = scales.tolist()
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise TypeError(f'scales must be a non-empty sequence of positive floats, got {type(scales).__name__} '
                        f'{scales!r}')
    if not len(scales):
        raise ValueError(f'scales must be a non-empty sequence of positive floats, got {scales!r}')
    return flip, tuple(check_float(s, f'scales[{i}]', minimum=0.0, above=True) for i, s in enumerate(scales))


@torch.no_grad()
def extract_embeddings(
        model: nn.Module,
        data: Union[Dataset, DataLoader],
        batch_size: int = 64,
        device: Union[str, torch.device, None] = 'auto',
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        num_workers: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embed every item of ``data`` with ``model`` in eval mode.

    With test-time augmentation the embedding is ``normalize(sum_{s in scales, f in flips} model(f(resize_s(x))))``:
    each view is resized by ``s`` (bilinear) and/or mirrored, and the unit-norm view embeddings are averaged and
    re-normalised.

    Args:
        model: Maps a batch of images to ``(N, D)`` embeddings (e.g. a CGDModel).
        data: A dataset of ``(image_tensor, label)`` pairs, or a DataLoader yielding batches of them.
        batch_size: Batch size when ``data`` is a dataset.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``...
        flip: Also embed the horizontally flipped images.
        scales: Resize factors of the views (1.0 = as given).
        num_workers: DataLoader workers when ``data`` is a dataset.
        amp_dtype: Autocast dtype (e.g. ``torch.bfloat16`` on CUDA), None for full precision.
        progress: Show a tqdm bar.

    Returns:
        ``(embeddings, labels)``: float32 ``(N, D)`` on the CPU, unit norm, and int64 ``(N,)``.
    """
    flip, scales = check_views(flip, scales)
    device = resolve_device(device)
    loader = data if isinstance(data, DataLoader) else DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == 'cuda')
    was_training = model.training
    model.eval().to(device)
    embeddings, labels = [], []
    try:
        for images, targets in tqdm(loader, desc='embedding', unit='batch', disable=not progress, leave=False):
            images = images.to(device, non_blocking=True)
            total = None
            for scale in scales:
                view = images if scale == 1 else F.interpolate(
                    images, scale_factor=float(scale), mode='bilinear', align_corners=False)
                for flipped in ((False, True) if flip else (False,)):
                    with autocast(device, amp_dtype):
                        emb = model(view.flip(-1) if flipped else view).float()
                    total = emb if total is None else total + emb
            embeddings.append(F.normalize(total, dim=-1).cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long))
    finally:
        model.train(was_training)
    if not embeddings:
        raise ValueError('data is empty: nothing to embed')
    return torch.cat(embeddings), torch.cat(labels)


def save_embeddings(path: PathLike, embeddings: torch.Tensor, labels: Optional[torch.Tensor] = None,
                    paths: Optional[List[str]] = None, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Write embeddings (and labels, image paths, metadata) to one ``.safetensors`` file, atomically, no pickle."""
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f'embeddings must be a torch.Tensor (torch.from_numpy for an array), '
                        f'got {type(embeddings).__name__}')
    if embeddings.ndim != 2:
        raise ValueError(f'embeddings must be (N, D), got {tuple(embeddings.shape)}')
    n = embeddings.shape[0]
    if (labels is not None and len(labels) != n) or (paths is not None and len(paths) != n):
        raise ValueError(f'labels and paths must have one entry per embedding ({n})')
    tensors = {'embeddings': embeddings.detach().float().cpu().contiguous()}
    if labels is not None:
        tensors['labels'] = torch.as_tensor(labels, dtype=torch.long).cpu().contiguous()
    header = {'paths': json.dumps(paths), 'metadata': json.dumps(metadata or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_embeddings(path: PathLike) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[List[str]],
                                                              Dict[str, Any]]:
    """Read a file of :func:`save_embeddings`: ``(embeddings, labels or None, paths or None, metadata)``."""
    try:
        with safe_open(str(path), framework='pt') as f:
            header = f.metadata() or {}
            embeddings = f.get_tensor('embeddings')
            labels = f.get_tensor('labels') if 'labels' in f.keys() else None
        return embeddings, labels, json.loads(header.get('paths', 'null')), json.loads(header.get('metadata', '{}'))
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f'{path} is not an embeddings file written by save_embeddings ({e})') from e
