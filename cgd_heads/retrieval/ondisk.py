"""IVF inverted lists kept in a file beside the index (faiss ``OnDiskInvertedLists``), saved so that the index folder
can be moved.

faiss writes the lists' file name into the index file and, read with ``IO_FLAG_ONDISK_SAME_DIR``, looks for a file of
that base name in the index file's folder. The index file is therefore written with the bare name
(``index.<hex>.ivfdata``), the file sits in the index folder, and ``index.json`` names it (format version 3) with its
size. The lists are memory-mapped: searching reads the pages it needs, the operating system keeps them as cache.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from .faiss_import import faiss

__all__ = ['on_disk_lists', 'is_on_disk', 'place_ivfdata', 'write_index_file', 'read_index_file', 'merge_on_disk',
           'quiet_c_stdout']


@contextlib.contextmanager
def quiet_c_stdout() -> Iterator[None]:
    """Silence what faiss's C++ code prints on stdout (``resizing ...``, ``IO_FLAG_ONDISK_SAME_DIR: updating ...``),
    which would otherwise land in a command's output (e.g. ``cgd-search --json``)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, 'w') as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def on_disk_lists(index: Any) -> Optional[Any]:
    """The ``OnDiskInvertedLists`` of an IVF index, or None (in-memory lists, or not an IVF index)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def is_on_disk(index: Any) -> bool:
    """Whether the faiss ``index`` keeps its inverted lists in a file."""
    return on_disk_lists(index) is not None


def place_ivfdata(index: Any, directory: Path) -> Optional[Dict[str, Any]]:
    """Make sure the lists file of an on-disk ``index`` is in ``directory``; return its ``index.json`` record
    ``{'file': name, 'size': bytes}`` (None for in-memory lists).

    A file already in ``directory`` keeps its name; one elsewhere is hard-linked (or copied) under a fresh name, so it
    never replaces a file the current ``index.json`` refers to.
    """
    lists = on_disk_lists(index)
    if lists is None:
        return None
    source = Path(lists.filename)
    if not source.is_file():
        raise FileNotFoundError(f'the on-disk inverted lists {source} of this index do not exist')
    if source.parent.resolve() == directory.resolve():
        target = source
    else:
        target = directory / f'index.{uuid.uuid4().hex}.ivfdata'
        try:
            os.link(source, target)
        except OSError:
            try:
                shutil.copyfile(source, target)
            except BaseException:
                target.unlink(missing_ok=True)  # a partial copy no index.json will ever name
                raise
    return {'file': target.name, 'size': target.stat().st_size}


@contextlib.contextmanager
def _bare_name(index: Any, name: Optional[str]) -> Iterator[None]:
    lists = on_disk_lists(index) if name else None
    if lists is None:
        yield
        return
    full = lists.filename
    lists.filename = name  # what the file records: found again in the index file's folder, wherever that moves
    try:
        yield
    finally:
        lists.filename = full


def write_index_file(index: Any, path: Path, ivfdata: Optional[Dict[str, Any]]) -> None:
    """``faiss.write_index``; an on-disk index records its lists file by the bare name ``ivfdata['file']``."""
    with _bare_name(index, ivfdata and ivfdata['file']):
        faiss.write_index(index, str(path))


def read_index_file(path: Path, ivfdata: Optional[Dict[str, Any]], json_path: Path) -> Any:
    """``faiss.read_index``; with ``ivfdata`` (the ``index.json`` record) the lists file is opened in ``path``'s
    folder after checking that it is there with the recorded size."""
    if ivfdata is None:
        return faiss.read_index(str(path))
    lists_path = path.parent / ivfdata['file']
    if not lists_path.is_file():
        raise FileNotFoundError(f'{json_path} refers to the on-disk inverted lists {lists_path}, which do not exist')
    if lists_path.stat().st_size != ivfdata['size']:
        raise ValueError(f'{lists_path} has {lists_path.stat().st_size} bytes but {json_path} records '
                         f'{ivfdata["size"]} (corrupt or replaced)')
    with quiet_c_stdout():
        index = faiss.read_index(str(path.resolve()), faiss.IO_FLAG_ONDISK_SAME_DIR)
    lists = on_disk_lists(index)
    if lists is None or Path(lists.filename).name != ivfdata['file']:
        raise ValueError(f'{path} does not keep its inverted lists in {ivfdata["file"]} as {json_path} says')
    return index


def merge_on_disk(trained: Any, part_files: List[Path], ivfdata_path: Path) -> None:
    """Fill the empty trained IVF index ``trained`` with the lists of the IVF index files ``part_files`` (read
    memory-mapped), written to the file ``ivfdata_path`` (faiss's ``merge_ondisk``)."""
    from faiss.contrib.ondisk import merge_ondisk
    with quiet_c_stdout():
        merge_ondisk(trained, [str(p) for p in part_files], str(ivfdata_path.resolve()))
