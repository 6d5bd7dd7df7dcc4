"""Indexes built from a units folder, streaming one unit at a time, and the loader of every saved layout.

* ``'ivf'`` (IVF-Flat, or IVF-PQ with ``pq_m``): the coarse quantiser (and the PQ codebooks) are trained on a
  bounded uniform sample of the units' vectors, then the units are added one by one, in order. With
  ``on_disk=True`` the inverted lists go to a file beside the index (faiss ``OnDiskInvertedLists``): groups of units
  are encoded into temporary part indexes of at most ``shard_size`` vectors, which faiss's ``merge_ondisk`` then
  merges into the lists file. The result is one :class:`~cgd_heads.retrieval.index.RetrievalIndex` folder.
* ``'flat'`` and ``'hnsw'``: a vector cannot be compressed, so the gallery is cut into shards of whole units of at
  most ``shard_size`` vectors, each an ordinary RetrievalIndex folder, searched as one by
  :class:`~cgd_heads.retrieval.shards.ShardedIndex` (the exact top k of the union for flat shards). ``shards.json``
  lists them, with the number of vectors and the units of each.

Ids are positions in unit order: the image ids when no image was skipped. For shards, the position of ``(shard, id)``
is ``id`` plus the vectors of the shards before it.

Both layouts are committed by one atomic write of their JSON file (``index.json`` or ``shards.json``), after which
the files of the other layout, or of a previous build, are deleted; :func:`load_index` opens either, and refuses a
folder holding both (a build stopped between the commit and the clean-up), which it could not tell apart.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..utils.atomic import atomic_write_json
from ..utils.checks import PathLike, check_bool, check_int
from .faiss_import import faiss
from .arrays import to_embedding_array
from .index import RetrievalIndex, check_metadata, check_whitening
from .index_file import METADATA_FILE, is_plain_file_name
from .index_types import INDEX_TYPES, make_index
from .ondisk import merge_on_disk
from .shards import ShardedIndex
from .units import EmbeddingUnit, EmbeddingUnits
from .whitening import Whitening

__all__ = ['build_index_from_units', 'load_index', 'save_index', 'SHARDS_FILE', 'DEFAULT_SHARD_SIZE',
           'default_train_size']

_logger = logging.getLogger(__name__)

#: The JSON file of a sharded index folder.
SHARDS_FILE = 'shards.json'
SHARDS_FORMAT = 'cgd_heads.sharded_index'
#: Vectors per shard (flat / HNSW) or per temporary part (on-disk IVF) unless told otherwise: 2 GB of 512-d float32.
DEFAULT_SHARD_SIZE = 1_000_000


def default_train_size(count: int, nlist: int, pq_nbits: Optional[int]) -> int:
    """Vectors sampled to train an IVF index: ``min(count, max(64 nlist, 256 * 2^pq_nbits))``.

    64 per coarse centroid is above the 39 faiss asks for (its k-means subsamples beyond 256 per centroid anyway),
    and ``256 * 2^pq_nbits`` is what its PQ k-means uses at most (65,536 for 8 bits).

    Args:
        count: Vectors in the units.
        nlist: Inverted lists.
        pq_nbits: Bits per PQ code, or None for IVF-Flat.
    """
    return min(count, max(64 * nlist, 256 * 2 ** pq_nbits if pq_nbits else 0))


def build_index_from_units(
        units: Union[EmbeddingUnits, PathLike],
        directory: PathLike,
        index_type: str = 'ivf',
        whitening: Optional[Whitening] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        train_size: Optional[int] = None,
        on_disk: bool = False,
        shard_size: int = DEFAULT_SHARD_SIZE,
        seed: int = 0,
        **index_kwargs: Any,
) -> Path:
    """Build an index over a complete units folder, reading one unit at a time, and save it into ``directory``.

    Peak memory, for N vectors of dimension d (``d' = whitening.dim`` with a whitening), units of U vectors, and
    Python lists of N labels and paths (about 60 bytes per item plus the path's length):

    * ``'ivf'`` training: the sample, ``4 d' T`` bytes for ``T = train_size`` (default :func:`default_train_size`),
      plus faiss's k-means buffers (about ``12 T`` bytes) and the centroids ``4 d' nlist``; freed before adding.
    * ``'ivf'`` adding, in memory: the codes and ids, ``N (c + 8)`` bytes with ``c = pq_m`` bytes per vector for
      IVF-PQ with 8-bit codes (``4 d'`` for IVF-Flat), plus the slack of faiss's growing lists (up to 2x on a list
      that just doubled), plus one unit ``4 d U`` (and its whitened copy, ``4 d' U``). 1M x 512-d with
      ``pq_m=64``: 72 MB of codes and 20 MB per 10,000-image unit; IVF-Flat would hold 2.06 GB.
    * ``'ivf'`` with ``on_disk=True``: the codes of one part, ``shard_size (c + 8)`` bytes, plus one unit; the merge
      then writes the lists file through a memory map (page cache the system can evict, not memory the process must
      keep), ``N (c + 8)`` bytes on disk.
    * ``'flat'`` / ``'hnsw'``: one shard at a time, ``4 d' S`` (+ the graph, about ``8 M S`` bytes for HNSW) with
      ``S = shard_size``, plus its vectors gathered from the units (``4 d S``). Searching loads every shard.

    Args:
        units: A units folder (or its :class:`~cgd_heads.retrieval.units.EmbeddingUnits`), every unit finished.
        directory: The index folder to write (created if missing; a previous index there is replaced).
        index_type: ``'ivf'`` (default), ``'flat'`` or ``'hnsw'``.
        whitening: A fitted whitening to store the vectors through (the units stay raw); recorded in the index.
        metadata: JSON-serialisable dict saved with the index; default: the units' model config as ``'model'``
            and class names as ``'class_names'``. A ``'units'`` entry (folder and fingerprints) is added.
        train_size: ``'ivf'``: vectors sampled uniformly (seeded) to train; None = :func:`default_train_size`.
        on_disk: ``'ivf'``: keep the inverted lists in a file beside the index.
        shard_size: Most vectors per shard (``'flat'`` / ``'hnsw'``) or per temporary part (``on_disk``); a unit
            is never split, so a unit larger than this makes a shard of its own.
        seed: Seed of the training sample.
        **index_kwargs: The index type's options (see :class:`~cgd_heads.retrieval.index.RetrievalIndex`);
            ``nlist`` defaults to ``max(1, min(4 sqrt(N), T / 39))``.

    Returns:
        ``directory``, to open with :func:`load_index`.
    """
    on_disk = check_bool(on_disk, 'on_disk')
    units = units if isinstance(units, EmbeddingUnits) else EmbeddingUnits.open(units)
    if index_type not in INDEX_TYPES:
        raise ValueError(f'index_type must be one of {INDEX_TYPES}, got {index_type!r}')
    if on_disk and index_type != 'ivf':
        raise ValueError(f"on_disk=True needs index_type='ivf' (inverted lists), got {index_type!r}")
    shard_size = check_int(shard_size, 'shard_size')
    counts = units.unit_counts()  # checks that every unit is finished
    if sum(counts) == 0:
        raise ValueError(f'{units.directory} holds no embeddings (every image was skipped)')
    if metadata is not None:
        meta = dict(metadata)
    else:
        meta = {key: value for key, value in (('model', units.model_config), ('class_names', units.class_names))
                if value is not None}
    meta['units'] = {'directory': str(units.directory.resolve()), 'model_fingerprint': units.model_fingerprint,
                     'list_fingerprint': units.list_fingerprint, 'count': sum(counts)}
    meta = check_metadata(meta)  # what the saved index would refuse, refused before any vector is read
    check_whitening(whitening, None, meta)
    if whitening is not None and whitening.input_dim != units.dim:
        raise ValueError(f'whitening takes {whitening.input_dim}-d vectors, but the units hold {units.dim}-d ones')
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if index_type == 'ivf':
        index = _train_ivf(units, counts, whitening, train_size, seed, index_kwargs)
        _build_ivf(units, counts, index, directory, whitening, meta, on_disk, shard_size)
        _remove_shards_layout(directory)
    else:
        _build_shards(units, counts, directory, index_type, whitening, meta, shard_size, index_kwargs)
        _remove_single_layout(directory)
    return directory


def load_index(directory: PathLike,
               expected_metadata: Optional[Mapping[str, Any]] = None) -> Union[RetrievalIndex, ShardedIndex]:
    """Open a saved index folder of either layout: a :class:`~cgd_heads.retrieval.index.RetrievalIndex`
    (``index.json``) or, for a folder with ``shards.json``, a :class:`~cgd_heads.retrieval.shards.ShardedIndex` of
    its shards in order.

    Args:
        directory: The folder (:meth:`RetrievalIndex.save` or :func:`build_index_from_units`).
        expected_metadata: Checked on every shard (see :meth:`RetrievalIndex.load`).

    Raises:
        FileNotFoundError: the folder holds neither file, or a shard is missing.
        ValueError: ``shards.json`` is corrupt or disagrees with its shards.
    """
    directory = Path(directory)
    path = directory / SHARDS_FILE
    if not path.is_file():
        return RetrievalIndex.load(directory, expected_metadata)
    if (directory / METADATA_FILE).is_file():
        raise ValueError(f'{directory} holds two saved indexes, {METADATA_FILE} and {SHARDS_FILE} (a build was '
                         f'stopped before it removed the previous one, or RetrievalIndex.save wrote over a sharded '
                         f'index: use save_index): build it again, or delete the one that is not wanted')
    info = _read_shards_json(path)
    shards = [RetrievalIndex.load(directory / s['folder'], expected_metadata) for s in info['shards']]
    for shard, record in zip(shards, info['shards']):
        if len(shard) != record['count'] or shard.index_type != info['index_type']:
            raise ValueError(f'{path} records {record["count"]} {info["index_type"]} vectors in {record["folder"]}, '
                             f'which holds {len(shard)} ({shard.index_type})')
    return ShardedIndex(shards)


def save_index(index: RetrievalIndex, directory: PathLike) -> Path:
    """Save ``index`` into ``directory`` with :meth:`RetrievalIndex.save`, replacing the index saved there before
    in either layout (a sharded one too, which ``RetrievalIndex.save`` alone would leave beside it)."""
    directory = index.save(directory)
    _remove_shards_layout(directory)
    return directory


def _vectors(unit: EmbeddingUnit, whitening: Optional[Whitening]) -> np.ndarray:
    # the checks RetrievalIndex.build makes (finite, unit norm): an IVF index built from units is filled directly
    x = to_embedding_array(unit.embeddings, f'the embeddings of unit {unit.index}') if len(unit) else \
        np.ascontiguousarray(unit.embeddings, dtype=np.float32)
    return whitening.apply(x) if whitening is not None and len(x) else x


def _train_ivf(units: EmbeddingUnits, counts: List[int], whitening: Optional[Whitening], train_size: Optional[int],
               seed: int, kwargs: Dict[str, Any]) -> Any:
    """An empty IVF index trained on a uniform sample of the units (read one at a time), and its params."""
    n = sum(counts)
    pq_nbits = kwargs.get('pq_nbits', 8) if kwargs.get('pq_m') is not None else None
    nlist_guess = kwargs.get('nlist', max(1, int(4 * math.sqrt(n))))
    size = default_train_size(n, nlist_guess, pq_nbits) if train_size is None else check_int(train_size, 'train_size')
    size = min(size, n)
    kwargs = dict(kwargs)
    kwargs.setdefault('nlist', max(1, min(int(4 * math.sqrt(n)), size // 39)))
    dim = whitening.dim if whitening is not None else units.dim
    index, params = make_index('ivf', dim, size, kwargs)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    sample = np.empty((size, dim), dtype=np.float32)
    offset, filled = 0, 0
    for unit, count in zip(range(units.num_units), counts):
        rows = chosen[np.searchsorted(chosen, offset):np.searchsorted(chosen, offset + count)] - offset
        if len(rows):
            sample[filled:filled + len(rows)] = _vectors(units.read_unit(unit), whitening)[rows]
            filled += len(rows)
        offset += count
    index.train(sample)
    del sample
    return index, params


def _build_ivf(units: EmbeddingUnits, counts: List[int], trained: Tuple[Any, Dict[str, Any]], directory: Path,
               whitening: Optional[Whitening], metadata: Dict[str, Any], on_disk: bool, shard_size: int) -> None:
    """Add every unit to the trained index (in memory, or part by part merged into a lists file), then save."""
    index, params = trained
    labels: List[Optional[int]] = []
    paths: List[Optional[str]] = []
    if not on_disk:
        for unit in units.iter_units():
            if len(unit):  # a unit whose images were all skipped holds a (0, 0) array
                index.add(_vectors(unit, whitening))
            labels.extend(unit.item_labels())
            paths.extend(unit.paths)
    else:
        trained_file = directory / f'.trained.{uuid.uuid4().hex}.faiss'
        faiss.write_index(index, str(trained_file))
        parts: List[Path] = []
        lists_file = directory / f'index.{uuid.uuid4().hex}.ivfdata'
        try:
            offset = 0
            for group in _groups(counts, shard_size):
                part = faiss.read_index(str(trained_file))
                for unit in units.iter_units(group):
                    if len(unit):
                        x = _vectors(unit, whitening)
                        part.add_with_ids(x, np.arange(offset, offset + len(x), dtype=np.int64))
                        offset += len(x)
                    labels.extend(unit.item_labels())
                    paths.extend(unit.paths)
                parts.append(directory / f'.part.{uuid.uuid4().hex}.faiss')
                faiss.write_index(part, str(parts[-1]))
                del part
            merge_on_disk(index, parts, lists_file)
        except BaseException:
            lists_file.unlink(missing_ok=True)  # named by nothing yet
            raise
        finally:
            for path in [trained_file, *parts]:
                path.unlink(missing_ok=True)
    try:
        RetrievalIndex(index, 'ivf', labels, paths, metadata, params, whitening).save(directory)
    except BaseException:
        if on_disk and not _named_by_index_json(directory, lists_file.name):
            lists_file.unlink(missing_ok=True)
        raise


def _groups(counts: List[int], size: int) -> Iterator[List[int]]:
    """Consecutive runs of units holding at most ``size`` vectors each (a larger unit alone)."""
    group: List[int] = []
    total = 0
    for unit, count in enumerate(counts):
        if group and total + count > size:
            yield group
            group, total = [], 0
        group.append(unit)
        total += count
    if group:
        yield group


def _build_shards(units: EmbeddingUnits, counts: List[int], directory: Path, index_type: str,
                  whitening: Optional[Whitening], metadata: Dict[str, Any], shard_size: int,
                  kwargs: Dict[str, Any]) -> None:
    """One RetrievalIndex folder per group of units, then ``shards.json`` (the commit point)."""
    previous = _shard_folders(directory)
    records: List[Dict[str, Any]] = []
    offset = 0
    try:
        for number, group in enumerate(_groups(counts, shard_size)):
            gathered = [units.read_unit(u) for u in group]
            if not any(len(u) for u in gathered):
                continue  # every image of these units was skipped
            emb = np.concatenate([u.embeddings for u in gathered if len(u)])
            labels = [label for u in gathered for label in u.item_labels()]
            paths = [path for u in gathered for path in u.paths]
            del gathered
            shard = RetrievalIndex.build(emb, labels, paths, index_type, dict(metadata, shard=number),
                                         whitening=whitening, **kwargs)
            del emb
            folder = f'shard-{number:05d}.{uuid.uuid4().hex[:12]}'
            shard.save(directory / folder)
            records.append({'folder': folder, 'count': len(shard), 'offset': offset, 'units': [group[0], group[-1]],
                            'params': shard.params})
            offset += len(shard)
            del shard
        atomic_write_json(directory / SHARDS_FILE, {'format': SHARDS_FORMAT, 'format_version': 1,
                                                    'index_type': index_type, 'count': offset, 'shards': records})
    except BaseException:
        for record in records:
            shutil.rmtree(directory / record['folder'], ignore_errors=True)
        raise
    for name in previous - {r['folder'] for r in records}:
        shutil.rmtree(directory / name, ignore_errors=True)


def _read_shards_json(path: Path) -> Dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f'{path} is not valid JSON (corrupt sharded index): {exc}') from exc
    if not isinstance(info, dict) or info.get('format') != SHARDS_FORMAT or info.get('format_version') != 1:
        raise ValueError(f'{path} is not a sharded index of this version of cgd_heads ({SHARDS_FORMAT} version 1)')
    shards = info.get('shards')
    if not isinstance(shards, list) or not shards or info.get('index_type') not in INDEX_TYPES or any(
            not isinstance(s, dict) or not isinstance(s.get('folder'), str) or not is_plain_file_name(s['folder'])
            or not isinstance(s.get('count'), int) for s in shards):
        raise ValueError(f'{path} must list its shards as {{"folder": name in the same folder, "count": int}}')
    return info


def _shard_folders(directory: Path) -> set:
    """The shard folders the current ``shards.json`` names, if it is readable."""
    try:
        return {s['folder'] for s in _read_shards_json(directory / SHARDS_FILE)['shards']}
    except (OSError, ValueError):
        return set()


def _remove_shards_layout(directory: Path) -> None:
    """After a single index was saved: drop a sharded index that was there before."""
    folders = _shard_folders(directory)
    (directory / SHARDS_FILE).unlink(missing_ok=True)
    for name in folders:
        shutil.rmtree(directory / name, ignore_errors=True)


def _named_by_index_json(directory: Path, name: str) -> bool:
    try:
        info = json.loads((directory / METADATA_FILE).read_text(encoding='utf-8'))
        return (info.get('ivfdata') or {}).get('file') == name
    except (OSError, ValueError, AttributeError):
        return False


def _remove_single_layout(directory: Path) -> None:
    """After shards were written: drop the single index (``index.json`` and its files) that was there before."""
    path = directory / METADATA_FILE
    if not path.is_file():
        return
    try:
        info = json.loads(path.read_text(encoding='utf-8'))
        names = [info.get('index_file'), (info.get('whitening') or {}).get('folder'),
                 (info.get('ivfdata') or {}).get('file')]
    except (OSError, ValueError, AttributeError):
        names = []
    path.unlink()
    for name in names:
        if isinstance(name, str) and is_plain_file_name(name):
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
