"""Argument checks shared by every layer, so a bad value gets the same kind of message wherever it is passed.

Each check returns the value it accepted (converted to the plain Python type) and raises ``TypeError`` for a value
of the wrong type, ``ValueError`` for a value of the right type outside the valid range, naming the argument.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = ['PathLike', 'check_bool', 'check_int', 'check_float', 'check_labels']

#: What every function taking a file or folder accepts.
PathLike = Union[str, os.PathLike]


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` as a ``bool`` if it is one (Python or NumPy): a truthy string such as ``'no'`` must not
    switch an option on.

    Raises:
        TypeError: ``value`` is not a bool.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f'{name} must be True or False, got {type(value).__name__} {value!r}')
    return bool(value)


def check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """Return ``value`` as an ``int`` if it is an integer (Python or NumPy, never a bool) ``>= minimum``.

    Args:
        value: The argument to check.
        name: The argument's name, for the message.
        minimum: Smallest valid value (1: a positive int; 0: a count that may be zero).
        allow_none: Accept None (returned as None), e.g. for "no limit".

    Raises:
        TypeError: ``value`` is not an integer (a float such as 2.0, a bool, a string).
        ValueError: ``value`` is below ``minimum``.
    """
    if value is None and allow_none:
        return None
    valid = 'a positive int' if minimum == 1 else f'an int >= {minimum}'
    valid += ' or None' if allow_none else ''
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{name} must be {valid}, got {type(value).__name__} {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be {valid}, got {value!r}')
    return int(value)


def check_float(value: Any, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                above: bool = False, below: bool = False, allow_none: bool = False) -> Optional[float]:
    """Return ``value`` as a ``float`` if it is a finite real number (int or float, never a bool) in range.

    Args:
        value: The argument to check.
        name: The argument's name, for the message.
        minimum: Lower bound, or None for none; ``above=True`` excludes it (``> minimum``).
        maximum: Upper bound, or None for none; ``below=True`` excludes it (``< maximum``).
        allow_none: Accept None (returned as None), e.g. for "use the default".

    Raises:
        TypeError: ``value`` is not a number (a string such as ``'1e-3'``, a bool).
        ValueError: ``value`` is NaN, infinite or outside the range.
    """
    if value is None and allow_none:
        return None
    bounds = []
    if minimum is not None:
        bounds.append(f'{">" if above else ">="} {minimum:g}')
    if maximum is not None:
        bounds.append(f'{"<" if below else "<="} {maximum:g}')
    valid = 'a finite float' + (' ' + ' and '.join(bounds) if bounds else '') + (' or None' if allow_none else '')
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f'{name} must be {valid}, got {type(value).__name__} {value!r}')
    number = float(value)
    if not math.isfinite(number) \
            or (minimum is not None and (number < minimum or (above and number == minimum))) \
            or (maximum is not None and (number > maximum or (below and number == maximum))):
        raise ValueError(f'{name} must be {valid}, got {value!r}')
    return number


def check_labels(labels: torch.Tensor, batch_size: int, num_classes: Optional[int] = None) -> None:
    """Raise TypeError/ValueError unless ``labels`` is an integer (N,) tensor with ids in [0, num_classes)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f'labels must be a torch.Tensor of class ids, got {type(labels).__name__}')
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f'labels must be an integer tensor (torch.long), got dtype {labels.dtype}')
    if labels.ndim != 1 or labels.shape[0] != batch_size:
        raise ValueError(f'labels must have shape ({batch_size},) to match the batch, got {tuple(labels.shape)}')
    if num_classes is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f'labels must be class ids in [0, {num_classes}) (num_classes={num_classes}), '
                             f'got values in [{low}, {high}]')
