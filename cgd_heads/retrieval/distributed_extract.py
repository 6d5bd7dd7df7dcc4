"""Extraction of a gallery into embedding units, in one process or in every process ``torchrun`` starts.

The same call runs everywhere: without ``torchrun`` it is one process; under ``torchrun --nproc_per_node N`` (the
engine training uses, :func:`cgd_heads.utils.distributed.init_distributed`) every rank joins the process group and
embeds its share:

1. rank 0 writes the folder's manifest (or checks that the one there was written for the same model, image list,
   preprocessing and unit size), deletes temporary files a killed run left, lists the units not finished yet and
   broadcasts that list (or its error) to every rank;
2. rank ``r`` of ``W`` embeds the listed units ``r, r + W, r + 2W, ...`` and writes each atomically as soon as it is
   done, so every image is embedded by exactly one rank (no padding duplicates, unlike ``DistributedSampler``);
3. all ranks meet at a barrier; rank 0 checks that every unit is finished.

A rerun (with any number of processes) embeds only what is missing. For tests, the environment variable
``CGD_HEADS_TEST_KILL_RANK=RANK:K`` makes rank ``RANK`` kill itself with SIGKILL after writing ``K`` units, in the
middle of its next unit (embedded, not written).
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from ..utils.checks import PathLike, check_int
from ..utils.distributed import DistributedContext, init_distributed
from ..utils.runtime import resolve_device
from .extract import check_views, extract_embeddings
from .units import DEFAULT_UNIT_SIZE, EmbeddingUnits, list_fingerprint, weights_fingerprint

__all__ = ['extract_units', 'rank_device', 'KILL_ENV']

_logger = logging.getLogger(__name__)

#: The test hook's environment variable, ``RANK:K`` (see the module docstring).
KILL_ENV = 'CGD_HEADS_TEST_KILL_RANK'


def rank_device(device: Union[str, torch.device, None], context: DistributedContext) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` (made current) when ``device`` is CUDA under torchrun.

    Args:
        device: ``'auto'``, ``'cpu'``, ``'cuda'``... (see :func:`~cgd_heads.utils.runtime.resolve_device`).
        context: The process group of this rank.
    """
    device = resolve_device(device)
    if context.enabled and device.type == 'cuda':
        device = torch.device('cuda', context.local_rank)
        torch.cuda.set_device(device)
    return device


def _check_inputs(dataset: Dataset, paths: Sequence[Optional[str]], labels: Sequence[int], unit_size: int,
                  batch_size: int, flip: bool, scales: Sequence[float],
                  amp_dtype: Optional[torch.dtype]) -> Tuple[int, int, bool, Tuple[float, ...]]:
    """(number of items, unit size, flip, scales) after checking that the three sequences agree and are not empty,
    and the views, batch size and autocast dtype (before the manifest records them: a bad value would block every
    later run)."""
    n = len(paths)
    if len(dataset) != n or len(labels) != n:
        raise ValueError(f'dataset, paths and labels must have the same length, got {len(dataset)}, {n} and '
                         f'{len(labels)}')
    if n == 0:
        raise ValueError('the image list is empty: nothing to embed')
    check_int(batch_size, 'batch_size')
    if amp_dtype not in (None, torch.bfloat16, torch.float16):
        raise TypeError(f'amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}')
    return (n, check_int(unit_size, 'unit_size'), *check_views(flip, scales))


def extract_units(
        model: nn.Module,
        dataset: Dataset,
        directory: PathLike,
        paths: Sequence[Optional[str]],
        labels: Sequence[int],
        fingerprint: Optional[str] = None,
        preprocessing: Optional[Mapping[str, Any]] = None,
        unit_size: int = DEFAULT_UNIT_SIZE,
        batch_size: int = 64,
        device: Union[str, torch.device, None] = 'auto',
        flip: bool = False,
        scales: Sequence[float] = (1.0,),
        num_workers: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        check_item: Optional[Callable[[int], Optional[str]]] = None,
        progress: bool = False,
        context: Optional[DistributedContext] = None,
        class_names: Optional[Sequence[str]] = None,
) -> EmbeddingUnits:
    """Embed ``dataset`` into the units folder ``directory``, skipping finished units (see the module docstring).

    Collective under ``torchrun``: every rank must call it with the same arguments.

    Args:
        model: The embedding model (e.g. a CGDModel); put in eval mode.
        dataset: ``(image, label)`` pairs, item ``i`` being image ``i`` of the list.
        directory: The units folder (created if missing).
        paths: The image path of every item (recorded in the units and fingerprinted).
        labels: The int label of every item.
        fingerprint: The model's fingerprint, e.g. :func:`~cgd_heads.retrieval.units.checkpoint_fingerprint` of its
            checkpoint folder; None = :func:`~cgd_heads.retrieval.units.weights_fingerprint` of ``model``.
        preprocessing: JSON record of how images become tensors (e.g. ``{'data_config': ...}``); ``flip``,
            ``scales`` and ``amp_dtype`` are added to it. A rerun must give the same.
        unit_size: Images per unit when the folder is created (must match an existing folder's).
        batch_size: Images per forward pass.
        device: ``'auto'``, ``'cpu'``, ``'cuda'``; under torchrun each rank uses ``cuda:LOCAL_RANK``.
        flip: Also embed the mirrored images (see :func:`~cgd_heads.retrieval.extract.extract_embeddings`).
        scales: Resize factors of the views.
        num_workers: DataLoader workers per rank.
        amp_dtype: Autocast dtype, None for full precision.
        check_item: Called with an item's position before a unit is embedded: None if the image can be read, else
            the reason, and the image is left out (recorded as skipped in its unit). None = read everything.
        progress: Show a bar of this rank's units.
        context: The process group; None = join the one ``torchrun`` describes (single process without it).
        class_names: The name of each label, recorded in the manifest (for the index metadata).

    Returns:
        The complete units folder.

    Raises:
        ValueError: the folder holds units of another model, image list, preprocessing or unit size.
    """
    n, unit_size, flip, scales = _check_inputs(dataset, paths, labels, unit_size, batch_size, flip, scales, amp_dtype)
    context = context if context is not None else init_distributed(resolve_device(device).type)
    device = rank_device(device, context)
    record = dict(preprocessing or {}, flip=flip, scales=list(scales),
                  amp_dtype=None if amp_dtype is None else str(amp_dtype).replace('torch.', ''))
    config = getattr(model, 'config', None)
    todo = _plan(directory, lambda: dict(
        count=n, unit_size=unit_size, model_fingerprint=fingerprint or weights_fingerprint(model),
        list_fingerprint=list_fingerprint(paths, labels), preprocessing=record,
        model_config=config if isinstance(config, dict) else None, class_names=class_names), context)
    units = EmbeddingUnits.open(directory)
    mine = todo[context.rank::context.world_size]
    kill_after = _kill_after(context.rank)
    embed = dict(batch_size=batch_size, device=device, flip=flip, scales=scales, num_workers=num_workers,
                 amp_dtype=amp_dtype, progress=False)
    bar = tqdm(mine, desc=f'units (rank {context.rank})', unit='unit', disable=not progress, leave=False)
    for written, unit in enumerate(bar):
        ids, skipped = _readable(units.unit_range(unit), check_item)
        embeddings = _embed(model, dataset, ids, embed)
        if kill_after is not None and written >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # the test hook: die mid-unit, the unit embedded but not written
        units.write_unit(unit, embeddings, [labels[i] for i in ids], [paths[i] for i in ids], ids, skipped,
                         writer=f'rank {context.rank} of {context.world_size}')
    context.barrier()
    if context.is_main:
        units.check_complete()
    return units


def _plan(directory: PathLike, create: Callable[[], Mapping[str, Any]], context: DistributedContext) -> List[int]:
    """Rank 0 opens (or creates) the folder (``create()``: the arguments of :meth:`EmbeddingUnits.create`, with
    the fingerprints, computed there only) and lists the unfinished units; every rank receives the list, or the
    error rank 0 met, re-raised everywhere so no rank waits for the others."""
    result: Tuple[Any, ...] = ()
    if context.is_main:
        try:
            units = EmbeddingUnits.create(directory, **create())
            removed = units.clean_temporary()
            if removed:
                _logger.info('removed %d temporary unit files left by an interrupted run', removed)
            result = ('ok', units.missing_units())
        except (ValueError, OSError) as exc:
            result = ('error', type(exc).__name__, str(exc))
    if context.enabled:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result[0] == 'error':
        kind = {'FileNotFoundError': FileNotFoundError, 'PermissionError': PermissionError}.get(result[1], ValueError)
        raise kind(result[2])
    return list(result[1])


def _readable(unit_range: Tuple[int, int], check_item: Optional[Callable[[int], Optional[str]]]
              ) -> Tuple[List[int], List[Tuple[int, str]]]:
    """The positions of the unit to embed and the ``(id, reason)`` of those left out."""
    ids = list(range(*unit_range))
    if check_item is None:
        return ids, []
    problems = [(i, check_item(i)) for i in ids]
    skipped = [(i, str(reason)) for i, reason in problems if reason is not None]
    for i, reason in skipped:
        _logger.warning('skipped unreadable image %d: %s', i, reason)
    return [i for i, reason in problems if reason is None], skipped


def _embed(model: nn.Module, dataset: Dataset, ids: List[int], kwargs: Mapping[str, Any]) -> torch.Tensor:
    if not ids:
        return torch.zeros((0, 0))
    embeddings, _ = extract_embeddings(model, Subset(dataset, ids), **kwargs)
    return embeddings


def _kill_after(rank: int) -> Optional[int]:
    value = os.environ.get(KILL_ENV, '')
    if not value:
        return None
    target, _, count = value.partition(':')
    return int(count) if int(target) == rank else None
