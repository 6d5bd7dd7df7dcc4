"""The off-the-shelf reference of a training run: what its starting backbone retrieves on the held-out classes.

Fine-tuning only pays if it beats the pretrained features it starts from. On fine-grained data it does by a wide
margin (CARS196: +25 R@1), on generic objects it may not at all (Caltech-101's classes overlap ImageNet's, and
stripping the last stride alone costs the pretrained features 2.6 R@1). So before the first epoch ``train`` measures
the starting backbone's pooled features on the same held-out classes that select the epoch,

    f(x) = GeM_p(F(x)) / ||GeM_p(F(x))||_2,   p = TrainConfig.gem_p,

once with the run's stride mode and, when the run changes the stride, once with the backbone untouched, and says
at the end whether the selected epoch beat the better of them.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from ..data import ImageList
from ..models.backbone import create_backbone
from ..models.off_the_shelf import OffTheShelfModel
from .config import TrainConfig
from .validation import validate

__all__ = ['off_the_shelf_reference', 'reference_verdict']

_logger = logging.getLogger(__name__)
_STRIDE_WORDS = {None: 'untouched', 'strip': 'stripped', 'dilate': 'dilated'}


def _has_weights(config: TrainConfig) -> bool:
    """Whether the run's backbone starts from weights a rebuild reproduces (else it is a fresh random network)."""
    return bool(config.pretrained or config.pretrained_from or config.checkpoint_path)


def _reference_models(config: TrainConfig) -> Iterator[Tuple[str, OffTheShelfModel]]:
    """The run's starting backbone pooled off the shelf: with its stride mode, then untouched when that differs.

    Built one at a time (a generator), so the previous one can be freed while the next is built."""
    for mode in dict.fromkeys((config.stride_mode, None)):  # the run's mode first; no duplicate when it is None
        backbone, features, model_state = create_backbone(config.model_name, config.pretrained, mode,
                                                          config.checkpoint_path, config.pretrained_from)
        if model_state is not None:  # continuing from a trained CGD model: its backbone is not "off the shelf"
            _logger.info('no off-the-shelf reference: checkpoint_path holds a trained CGD model, not backbone weights')
            return
        label = f'off-the-shelf GeM p={config.gem_p:g}, stride {_STRIDE_WORDS[features.stride_mode]}'
        yield label, OffTheShelfModel(backbone, features, config.gem_p).eval()
        if features.stride_mode is None:  # untouched already, or a token backbone (no stride to change)
            return


def off_the_shelf_reference(config: TrainConfig, val_list: ImageList, data_config: Dict[str, Any],
                            device: torch.device, amp: Optional[torch.dtype] = None) -> Dict[str, Dict[str, float]]:
    """Held-out metrics of the starting backbone's GeM features, before any training.

    Args:
        config: The run's settings (backbone, its weights, stride mode, GeM's p, batch size, workers).
        val_list: The held-out classes that select the epoch.
        data_config: Preprocessing of the run (the same images as validation sees).
        device: Where to embed.
        amp: Autocast dtype of the run's validation (None: float32).

    Returns:
        ``{label: metrics}`` in the order measured (the run's stride mode first). Empty (and logged) when there is
        no off-the-shelf start: a backbone from random weights (no ``pretrained``, ``pretrained_from`` or
        ``checkpoint_path``; a rebuild would be another random network), or ``checkpoint_path`` holding a whole
        trained CGD model.
    """
    if not _has_weights(config):
        _logger.info('no off-the-shelf reference: the backbone starts from random weights (no pretrained, '
                     'pretrained_from or checkpoint_path)')
        return {}
    rows: Dict[str, Dict[str, float]] = {}
    for label, model in _reference_models(config):
        rows[label] = validate(model.to(device), val_list, data_config, device, config.eval_batch_size,
                               config.num_workers, amp)
    return rows


def reference_verdict(best: Optional[float], reference: Dict[str, Dict[str, float]],
                      metric: str) -> Optional[Tuple[bool, str]]:
    """Did the selected epoch's held-out ``metric`` beat the better off-the-shelf row? ``(beaten, sentence)``.

    None when there is nothing to compare (no reference, or no validated epoch).
    """
    if best is None or not reference:
        return None
    label, top = max(reference.items(), key=lambda item: item[1][metric])
    gap = 100 * (best - top[metric])
    noise = ''
    queries = top.get('num_queries')
    if metric in ('recall@1', 'precision@1') and queries:
        # a hit rate over n queries: the difference of two such rates has a standard error of about
        # sqrt(2 p (1 - p) / n), so a smaller gap is not evidence either way
        se = 100 * math.sqrt(2 * top[metric] * (1 - top[metric]) / queries)
        if abs(gap) < se:
            noise = f', within the noise of {queries} held-out queries (standard error of the difference ~{se:.2f})'
    if gap > 0:
        return True, (f'the selected epoch beats the off-the-shelf reference on the held-out classes: {metric} '
                      f'{100 * best:.2f} vs {100 * top[metric]:.2f} ({label}), {gap:+.2f} points{noise}')
    return False, (f'the selected epoch does NOT beat the off-the-shelf reference on the held-out classes: '
                   f'{metric} {100 * best:.2f} vs {100 * top[metric]:.2f} ({label}), {gap:+.2f} points{noise}; on '
                   f'data like this keep the pretrained features (cgd-eval --off-the-shelf MODEL) or change the '
                   f'recipe (docs/training.md, "Adapting the recipe to other data")')
