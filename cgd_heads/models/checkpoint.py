"""Checkpoints without pickle: ``config.json`` + ``model.safetensors`` (+ ``training_state.safetensors``).

A checkpoint is a folder written atomically as a whole (:func:`cgd_heads.utils.atomic.atomic_dir`):

* ``config.json``: the :func:`cgd_heads.create_model` arguments that rebuild the model (``"model"``), the
  backbone's ``pretrained_cfg``, the format version, and whatever the writer adds (data config, class names, epoch,
  metrics);
* ``model.safetensors``: the model's state dict;
* ``training_state.safetensors`` (training checkpoints only): optimizer, scheduler and loop counters. Nested
  states are stored as a JSON skeleton in the safetensors metadata with the tensors alongside, so loading never
  unpickles anything.

The layout is what ``huggingface_hub`` uploads as is, and loads offline. This module is the file format only;
rebuilding a model from a folder is :func:`cgd_heads.models.cgd_model.load_pretrained`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import torch.nn as nn

from ..utils.atomic import atomic_dir, resolve_dir
from ..utils.checks import PathLike
from ..version import __version__

__all__ = [
    'save_pretrained', 'load_config', 'config_diff', 'load_weights',
    'load_training_state', 'check_extra', 'CONFIG_NAME', 'WEIGHTS_NAME', 'TRAINING_STATE_NAME', 'FORMAT_VERSION',
    'RESERVED_CONFIG_KEYS',
]

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
TRAINING_STATE_NAME = 'training_state.safetensors'
FORMAT = 'cgd_heads'
FORMAT_VERSION = 1


def save_pretrained(
        model: nn.Module,
        directory: PathLike,
        extra: Optional[Dict[str, Any]] = None,
        training_state: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model`` (and optionally a training state) to the checkpoint folder ``directory``, atomically.

    Args:
        model: A model from :func:`cgd_heads.create_model` (its ``config`` rebuilds it).
        directory: Destination folder; replaced as a whole.
        extra: JSON-serialisable entries added to ``config.json`` (e.g. ``{"data": ..., "epoch": 3}``); its keys
            must not be the ones this function writes (``model``, ``format``, ...).
        training_state: Nested dict of tensors and JSON values (optimizer/scheduler state dicts, counters).

    Returns:
        The folder path.
    """
    config = getattr(model, 'config', None)
    if not isinstance(model, nn.Module) or not isinstance(config, dict) or not config.get('model_name'):
        raise TypeError('save_pretrained needs a CGDModel built by cgd_heads.create_model (its config rebuilds it)')
    config = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'cgd_heads_version': __version__,
              'model': model.config, 'pretrained_cfg': _jsonable(model.pretrained_cfg)}
    check_extra(extra)
    config.update(extra or {})
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + '\n', encoding='utf-8')
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={'format': 'pt'})
        if training_state is not None:
            tensors: Dict[str, torch.Tensor] = {}
            skeleton = _encode(training_state, 'state', tensors)
            save_file(tensors, str(tmp / TRAINING_STATE_NAME), metadata={'skeleton': json.dumps(skeleton)})
    return directory


#: The ``config.json`` keys :func:`save_pretrained` writes itself; ``extra`` must not replace them.
RESERVED_CONFIG_KEYS = ('format', 'format_version', 'cgd_heads_version', 'model', 'pretrained_cfg')


def check_extra(extra: Optional[Dict[str, Any]]) -> None:
    """Refuse ``extra`` entries that would replace what :func:`save_pretrained` writes ('model' would replace the
    config that rebuilds the model, 'format' make the folder unreadable)."""
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f'extra must be a dict or None, got {type(extra).__name__}')
    clash = sorted(set(extra or {}) & set(RESERVED_CONFIG_KEYS))
    if clash:
        raise ValueError(f'extra must not hold the keys save_pretrained writes itself, got {clash}')


def load_config(directory: PathLike) -> Dict[str, Any]:
    """Read and check ``config.json`` of a checkpoint folder."""
    path = resolve_dir(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: {directory} is not a cgd_heads checkpoint folder '
                                f'(expected {CONFIG_NAME} and {WEIGHTS_NAME})')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e}); the checkpoint is corrupt') from e
    if not isinstance(config, dict) or config.get('format') != FORMAT or 'model' not in config:
        raise ValueError(f'{path} is not a cgd_heads checkpoint config (no "format": "{FORMAT}" / "model")')
    if config.get('format_version', 0) > FORMAT_VERSION:
        raise ValueError(f'{path} has format_version {config["format_version"]}; this cgd_heads reads up to '
                         f'{FORMAT_VERSION}: upgrade cgd_heads')
    return config


def _as_json(config: Dict[str, Any]) -> Dict[str, Any]:
    try:
        return json.loads(json.dumps(config))
    except (TypeError, ValueError):  # not JSON-serialisable: compared as given
        return config


def config_diff(expected: Dict[str, Any], actual: Dict[str, Any]) -> List[str]:
    """Human-readable differences ``'key: expected != actual'`` between two model configs (keys of either), compared
    as JSON reads them back (a tuple equals the list a saved config holds)."""
    expected, actual = _as_json(expected), _as_json(actual)
    return [f'{k}: {expected.get(k)!r} != {actual.get(k)!r}' for k in sorted(set(expected) | set(actual))
            if expected.get(k) != actual.get(k)]


def load_weights(model: nn.Module, directory: PathLike, map_location: Union[str, torch.device] = 'cpu') -> nn.Module:
    """Load ``model.safetensors`` of a checkpoint folder into ``model``, strictly (no pickle).

    Raises:
        FileNotFoundError: the folder has no weights file.
        ValueError: the file is corrupt or its keys / shapes do not match ``model``.
    """
    weights = resolve_dir(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f'{weights} not found: the checkpoint folder is incomplete')
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f'{weights} is not a readable safetensors file ({e}); the checkpoint is corrupt') from e
    except RuntimeError as e:  # size mismatch
        raise ValueError(f'{weights} does not match the model described by {CONFIG_NAME}: {e}') from e
    if missing or unexpected:
        raise ValueError(f'{weights} does not match the model described by {CONFIG_NAME}: missing '
                         f'{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}')
    return model


def load_training_state(directory: PathLike, map_location: Union[str, torch.device] = 'cpu') -> Dict[str, Any]:
    """Read the training state saved next to a checkpoint's weights."""
    path = resolve_dir(directory) / TRAINING_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: {directory} is not a training checkpoint (nothing to resume)')
    try:
        tensors = load_file(str(path), device=str(map_location))
        with safe_open(str(path), framework='pt') as f:
            skeleton = json.loads(f.metadata()['skeleton'])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f'{path} is not a readable training state ({e}); the checkpoint is corrupt') from e
    return _decode(skeleton, tensors)


def _jsonable(obj: Any) -> Any:
    """pretrained_cfg holds tuples and occasionally callables; keep what JSON can hold."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def _encode(obj: Any, path: str, tensors: Dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of a nested state; tensors are moved to ``tensors`` and referenced by key.

    A key is the tensor's path made unique by a counter: paths alone can collide (``{1: a, '1': b}``, or ``'a.b'``
    against ``{'a': {'b': ...}}``) and one tensor would silently replace the other. :func:`_decode` reads the keys
    from the skeleton, so states saved with plain paths load as before.
    """
    if isinstance(obj, torch.Tensor):
        key = f'{len(tensors)}:{path}'
        tensors[key] = obj.detach().to('cpu').contiguous().clone()
        return {'__tensor__': key}
    if isinstance(obj, dict):
        # optimizer states are keyed by int parameter ids: keep key types by storing pairs
        return {'__dict__': [[k, _encode(v, f'{path}.{k}', tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f'{path}.{i}', tensors) for i, v in enumerate(obj)]
        return {'__tuple__': items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f'cannot store {type(obj).__name__} at {path} in a training state (tensors and JSON values only)')


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if '__tensor__' in obj:
            return tensors[obj['__tensor__']]
        if '__dict__' in obj:
            return {k: _decode(v, tensors) for k, v in obj['__dict__']}
        if '__tuple__' in obj:
            return tuple(_decode(v, tensors) for v in obj['__tuple__'])
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
