"""Extract a zip archive once into a user cache folder, atomically, never beside the archive.

Data folders are often read-only (CI mounts, shared disks), so archives are extracted under
``$CGD_HEADS_CACHE`` (default ``~/.cache/cgd_heads``). The target folder name carries the archive's size and
modification time, so a replaced archive is extracted afresh instead of silently reusing stale files.
Extraction goes to a hidden temporary folder next to the target and is renamed into place only when complete:
a concurrent process or an interrupted run can never see a half-extracted folder (a rename of a folder is
atomic on POSIX and Windows, and fails rather than merging if the target already exists).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from ..utils.checks import PathLike
from .annotation_files import require_file

__all__ = ['cache_root', 'extract_zip_cached', 'CACHE_ENV_VAR']

CACHE_ENV_VAR = 'CGD_HEADS_CACHE'


def cache_root() -> Path:
    """The cache folder: ``$CGD_HEADS_CACHE`` if set and non-empty, else ``~/.cache/cgd_heads``."""
    env = os.environ.get(CACHE_ENV_VAR, '').strip()
    return Path(env).expanduser().absolute() if env else Path.home() / '.cache' / 'cgd_heads'


def extract_zip_cached(zip_path: PathLike, namespace: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Extract ``zip_path`` to ``<cache>/<namespace>/<zip stem>-<size>-<mtime_ns>/`` unless already there.

    Args:
        zip_path: The archive (only read).
        namespace: Sub-folder of the cache (e.g. the data set name).
        cache_dir: Cache folder; defaults to :func:`cache_root`.

    Returns:
        The folder holding the archive's contents.

    Raises:
        FileNotFoundError: If the archive is missing.
        ValueError: If it is not a valid zip file.
        OSError: If the cache folder cannot be written.
    """
    zip_path = require_file(zip_path, 'zip archive')
    stat = zip_path.stat()
    parent = (Path(cache_dir).expanduser().absolute() if cache_dir is not None else cache_root()) / namespace
    target = parent / f'{zip_path.stem}-{stat.st_size}-{stat.st_mtime_ns}'
    if target.is_dir():
        return target
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', suffix='.partial', dir=parent))
    try:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                # extractall drops '..' and absolute parts of member names, so nothing lands outside tmp
                archive.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise ValueError(f'{zip_path} is not a valid zip archive: {e}') from e
        try:
            os.rename(tmp, target)
        except OSError:
            # another process finished the same extraction first: use its copy
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
