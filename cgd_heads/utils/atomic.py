"""Atomic file writes: a crash in the middle of a save never leaves a half-written file behind.

The writer produces a temporary file in the destination folder (same file system, so the final
``os.replace`` is atomic on POSIX and Windows), flushes it to disk, then renames it over the target and flushes
the folder's entry. The result gets the permissions a plain ``open`` would give it (``mkstemp``'s own are 0600).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .checks import PathLike

__all__ = ['atomic_path', 'atomic_write_json', 'read_json', 'atomic_dir', 'resolve_dir']


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what ``open``/``mkdir`` would create (the umask is only readable by setting
    it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask


def _fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename is durable only then); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``path`` atomically.

    Args:
        path: Final destination. Its parent folder must exist and be writable.

    Example:
        >>> with atomic_path('model.safetensors') as tmp:  # doctest: +SKIP
        ...     safetensors.torch.save_file(tensors, str(tmp))

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # fsync so the rename never exposes a file whose data is still only in the page cache
        with open(tmp_path, 'rb+') as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _umask_mode(0o666))
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n', encoding='utf-8')


def read_json(path: PathLike, what: str) -> Any:
    """The JSON value in ``path``, the counterpart of :func:`atomic_write_json`.

    Raises:
        FileNotFoundError: ``path`` is missing: ``'no saved {what} in {folder}: {path} does not exist'``.
        ValueError: it is not valid UTF-8 JSON: ``'{path} is not valid JSON (corrupt {what} metadata)'``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no saved {what} in {path.parent}: {path} does not exist')
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f'{path} is not valid JSON (corrupt {what} metadata): {exc}') from exc


def _previous(path: Path) -> Path:
    return path.with_name(f'.{path.name}.previous')


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder ``path`` as a whole.

    POSIX cannot rename a folder over a non-empty one, so the swap is two renames: ``path`` -> ``.name.previous``,
    then temporary -> ``path``. A crash between them leaves ``.name.previous`` complete, and :func:`resolve_dir`
    returns it; a crash before them leaves ``path`` untouched. Readers should open folders through
    :func:`resolve_dir`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, 'rb+') as fh:
                os.fsync(fh.fileno())
        previous = _previous(path)
        if path.exists():
            if previous.exists():  # leftover of a finished swap
                shutil.rmtree(previous)
            os.replace(path, previous)
        os.chmod(tmp, _umask_mode(0o777))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        # path is now complete and newer than any previous copy (also one left by an interrupted swap)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_dir(path: PathLike) -> Path:
    """The folder written by :func:`atomic_dir` at ``path``, or its previous copy if a swap was interrupted."""
    path = Path(path)
    if not path.exists() and _previous(path).is_dir():
        return _previous(path)
    return path
