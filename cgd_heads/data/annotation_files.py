"""Shared checks and parsing for the readers' annotation files, with errors that name the file and line."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Tuple, TypeVar

from ..utils.checks import PathLike

__all__ = ['require_dir', 'require_file', 'read_rows', 'parse_field']

T = TypeVar('T')


def require_dir(path: PathLike, what: str) -> Path:
    """Return ``path`` as an absolute Path if it is a folder.

    Args:
        path: Folder to check.
        what: What the folder should hold, for the error message.

    Raises:
        FileNotFoundError: If it does not exist.
        NotADirectoryError: If it is not a folder.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f'{what}: folder {path} does not exist')
    if not path.is_dir():
        raise NotADirectoryError(f'{what}: {path} is not a folder')
    return path


def require_file(path: PathLike, what: str) -> Path:
    """Return ``path`` as an absolute Path if it is a file.

    Args:
        path: File to check.
        what: What the file is, for the error message.

    Raises:
        FileNotFoundError: If it is missing or not a regular file.
    """
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f'{what}: file {path} does not exist')
    return path


def read_rows(path: Path, num_fields: int, skip_lines: int = 0) -> List[Tuple[int, List[str]]]:
    """Read a whitespace-separated text table.

    The last field takes the rest of the line, so it may contain spaces (file names sometimes do).
    Blank lines are ignored.

    Args:
        path: Text file (UTF-8).
        num_fields: Fields per row.
        skip_lines: Leading lines to skip (headers).

    Returns:
        ``(line_number, fields)`` pairs, line numbers 1-based.

    Raises:
        ValueError: If a row has fewer than ``num_fields`` fields.
    """
    rows = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, start=1):
            if lineno <= skip_lines or not line.strip():
                continue
            fields = line.split(maxsplit=num_fields - 1)
            if len(fields) != num_fields:
                raise ValueError(f'{path}, line {lineno}: expected {num_fields} whitespace-separated fields, '
                                 f'got {line.strip()!r}')
            fields[-1] = fields[-1].rstrip()
            rows.append((lineno, fields))
    return rows


def parse_field(value: str, convert: Callable[[str], T], path: Path, lineno: int, name: str) -> T:
    """Convert one field (``int``, ``float``, ...) or raise a ValueError naming the file, line and column."""
    try:
        return convert(value)
    except ValueError as e:
        raise ValueError(f'{path}, line {lineno}: {name} must be {getattr(convert, "__name__", "valid")}, '
                         f'got {value!r}') from e
