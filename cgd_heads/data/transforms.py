"""The CGD image transforms (Jun et al. 2019, section 4.1), normalised with a timm model's data config.

CGD trains on images resized to 252x252 and randomly cropped to 224x224 with random horizontal flips, and
evaluates on images resized to 224x224. Both resizes squash the image to a square, ignoring its aspect ratio:
that is the paper's recipe (not timm's aspect-preserving resize + center crop), and it keeps the whole object
in view, which matters for retrieval where a center crop could cut off the part that tells classes apart.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import timm.data
import torch.nn as nn
from timm.data.transforms import str_to_interp_mode
from torchvision import transforms as T

from ..utils.checks import check_bool, check_int

__all__ = ['create_cgd_transform', 'data_config_of', 'CGD_RESIZE_RATIO']

#: Train-time resize over crop size in the paper (252 / 224).
CGD_RESIZE_RATIO = 252 / 224


def _stats(data_config: Mapping[str, Any], key: str) -> Sequence[float]:
    if key not in data_config:
        raise ValueError(f'data_config must have {key!r} (e.g. from timm.data.resolve_model_data_config(model)), '
                         f'got keys {sorted(data_config)}')
    value = data_config[key]
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        value = tuple(float(v) for v in value)
    except (TypeError, ValueError) as e:
        raise TypeError(f'data_config[{key!r}] must be a float or a sequence of floats, got {value!r}') from e
    if len(value) not in (1, 3):
        raise ValueError(f'data_config[{key!r}] must have 1 or 3 values (per RGB channel), got {value!r}')
    if key == 'std' and any(v <= 0 for v in value):
        raise ValueError(f"data_config['std'] must be > 0, got {value!r}")
    return value


def create_cgd_transform(
        data_config: Mapping[str, Any],
        is_training: bool,
        img_size: int = 224,
        resize_size: Optional[int] = None,
) -> T.Compose:
    """Build the CGD train or eval transform for RGB PIL images.

    Train: ``Resize((r, r))`` -> ``RandomCrop(img_size)`` -> ``RandomHorizontalFlip`` -> ``ToTensor`` ->
    ``Normalize``. Eval: ``Resize((img_size, img_size))`` -> ``ToTensor`` -> ``Normalize``. The resizes squash to
    a square (the CGD recipe, see the module docstring).

    Args:
        data_config: timm data config with ``'mean'`` and ``'std'`` (per channel, for ``[0, 1]`` pixels) and
            optionally ``'interpolation'`` (``'bilinear'``, ``'bicubic'``, ...; default ``'bilinear'``), e.g.
            ``timm.data.resolve_model_data_config(model)``. Its ``input_size``/``crop_pct`` are not used.
        is_training: Train (random crop + flip) or eval transform.
        img_size: Side of the output square.
        resize_size: Train-time resize side before the random crop; defaults to ``round(img_size * 252 / 224)``
            (252 for 224). Must be >= ``img_size``. Unused at eval time.

    Returns:
        A ``torchvision.transforms.Compose`` producing ``3 x img_size x img_size`` float tensors.

    Raises:
        ValueError: If a size is not a positive int, ``resize_size < img_size``, or mean/std are missing/invalid.
        TypeError: If ``data_config`` is not a mapping.
    """
    if not isinstance(data_config, Mapping):
        raise TypeError(f'data_config must be a dict like timm.data.resolve_model_data_config(model) returns, '
                        f'got {type(data_config).__name__}')
    img_size = check_int(img_size, 'img_size')
    mean, std = _stats(data_config, 'mean'), _stats(data_config, 'std')
    interp_name = data_config.get('interpolation') or 'bilinear'
    if interp_name == 'random':
        # timm's 'random' picks a mode per call; a fixed recipe keeps train and eval comparable
        interp_name = 'bilinear'
    try:
        interpolation = str_to_interp_mode(interp_name)
    except KeyError as e:
        raise ValueError(f"data_config['interpolation'] must be a timm interpolation name such as 'bilinear', "
                         f"'bicubic', 'nearest' or 'lanczos', got {interp_name!r}") from e
    normalize = [T.ToTensor(), T.Normalize(mean=mean, std=std)]
    if not check_bool(is_training, 'is_training'):  # 'False' must not give the training transform
        return T.Compose([T.Resize((img_size, img_size), interpolation=interpolation), *normalize])
    if resize_size is None:
        resize_size = round(img_size * CGD_RESIZE_RATIO)
    resize_size = check_int(resize_size, 'resize_size')
    if resize_size < img_size:
        raise ValueError(f'resize_size must be >= img_size ({img_size}) for the random crop, got {resize_size}')
    return T.Compose([
        T.Resize((resize_size, resize_size), interpolation=interpolation),
        T.RandomCrop(img_size),
        T.RandomHorizontalFlip(),
        *normalize,
    ])


def data_config_of(model: nn.Module, img_size: int, resize_size: Optional[int] = None) -> Dict[str, Any]:
    """Preprocessing of a model (timm's mean/std/interpolation) plus the CGD sizes, as stored in checkpoints and read
    by :func:`create_cgd_transform`."""
    cfg = timm.data.resolve_model_data_config(model)
    return {'mean': list(cfg['mean']), 'std': list(cfg['std']), 'interpolation': cfg.get('interpolation', 'bilinear'),
            'img_size': img_size, 'resize_size': resize_size}
