"""Reading MATLAB struct arrays and cell arrays of strings (the Stanford Cars annotations) with scipy.

``scipy.io.loadmat`` wraps every MATLAB value in at least a 2-D array (a scalar is ``[[39]]``, a string is
``['00001.jpg']``, a 1 x N struct array is ``(1, N)``). Loading with ``squeeze_me=True`` and
``struct_as_record=False`` removes the wrappers, but also turns a one-element struct array into a bare struct,
so :func:`struct_rows` restores the list with ``numpy.atleast_1d``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

__all__ = ['load_mat', 'struct_rows', 'string_list']


def load_mat(path: Path) -> Dict[str, Any]:
    """Load a MAT file (format v4/v5/v7, what the Stanford Cars devkit ships) with squeezed values.

    Raises:
        ValueError: If the file is not a MAT file scipy can read (e.g. v7.3, which is HDF5).
    """
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
    except NotImplementedError as e:
        raise ValueError(f'cannot read {path}: MATLAB v7.3 (HDF5) files are not supported, save it with '
                         f"-v7 or use the devkit's original file ({e})") from e
    except (MatReadError, ValueError, TypeError, OSError) as e:
        raise ValueError(f'cannot read {path} as a MATLAB file: {e}') from e


def _variable(mat: Dict[str, Any], name: str, path: Path) -> Any:
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith('__'))
        raise ValueError(f'{path} has no variable {name!r} (variables: {found})')
    return mat[name]


def struct_rows(mat: Dict[str, Any], name: str, fields: Sequence[str], path: Path) -> List[Dict[str, Any]]:
    """Return the struct array ``name`` as a list of ``{field: value}`` dicts.

    Args:
        mat: Output of :func:`load_mat`.
        name: Variable name (e.g. ``'annotations'``).
        fields: Fields that must be present; only these are returned.
        path: File the variable came from, for error messages.

    Raises:
        ValueError: If the variable is missing, not a struct array, or lacks a field.
    """
    rows = []
    for i, record in enumerate(np.atleast_1d(_variable(mat, name, path)).ravel()):
        present = getattr(record, '_fieldnames', None)
        if present is None:
            raise ValueError(f'{path}: {name!r} must be a struct array, element {i} is {type(record).__name__}')
        missing = [f for f in fields if f not in present]
        if missing:
            raise ValueError(f'{path}: {name!r} lacks the fields {missing} (it has {present})')
        rows.append({f: getattr(record, f) for f in fields})
    return rows


def string_list(mat: Dict[str, Any], name: str, path: Path) -> List[str]:
    """Return the cell array (or char array) of strings ``name`` as a list of str.

    Raises:
        ValueError: If the variable is missing or holds something other than strings.
    """
    values = np.atleast_1d(_variable(mat, name, path)).ravel()
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ValueError(f'{path}: {name!r} must hold strings, element {i} is {type(v).__name__} {v!r}')
        out.append(v)
    return out
