"""A persistent faiss index of L2-normalised embeddings with per-item labels, paths and model metadata.

Embeddings are unit vectors, so the inner product is the cosine similarity:

    score(q, x) = <q, x> = cos(q, x)        for ||q|| = ||x|| = 1

and every index type below is built with ``faiss.METRIC_INNER_PRODUCT`` (higher score = more similar).

On disk an index is a folder holding ``index.json`` (dim, count, index type, metric, search parameters, labels,
paths, metadata, format version, name and SHA-256 of the faiss file) and the faiss file it names, written by
``faiss.write_index``. No pickle is involved anywhere. ``index.json`` is the commit point: the faiss file gets a
fresh name on every save and is written first, so a save that fails at any step leaves the previous
``index.json`` pointing at the previous, intact faiss file.
"""
from __future__ import annotations

import copy
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.atomic import atomic_path, atomic_write_json
from ..utils.checks import PathLike, check_int
from .arrays import ArrayLike, to_embedding_array
from .faiss_import import faiss
from .index_file import (FORMAT_VERSION, METADATA_FILE, METRIC, check_info, compare_metadata, is_plain_file_name,
                         sha256)
from .index_types import FAISS_CLASSES, INDEX_TYPES, apply_search_params, check_params, make_index

__all__ = ['RetrievalIndex', 'SearchHit', 'INDEX_TYPES', 'FORMAT_VERSION', 'METADATA_FILE']


@dataclass(frozen=True)
class SearchHit:
    """One search result: the item's position in the index, its cosine score, label and path."""

    id: int
    score: float
    label: Optional[int]
    path: Optional[str]


def _check_labels(labels: Any, n: int) -> List[Optional[int]]:
    """Return ``labels`` as a list of ``int`` or ``None`` of length ``n`` (``None`` input: all ``None``)."""
    if labels is None:
        return [None] * n
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in 'iu':
            raise TypeError(f'labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}')
        labels = labels.tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f'labels must be a sequence of int or None, got {type(labels).__name__}')
    if len(labels) != n:
        raise ValueError(f'labels must have one entry per embedding ({n}), got {len(labels)}')
    out: List[Optional[int]] = []
    for i, label in enumerate(labels):
        if label is None:
            out.append(None)
        elif isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
            out.append(int(label))
        else:
            raise TypeError(f'labels[{i}] must be an int or None, got {type(label).__name__} {label!r}')
    return out


def _check_paths(paths: Any, n: int) -> List[Optional[str]]:
    """Return ``paths`` as a list of ``str`` or ``None`` of length ``n`` (``None`` input: all ``None``)."""
    if paths is None:
        return [None] * n
    if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
        raise TypeError(f'paths must be a sequence of str, os.PathLike or None, got {type(paths).__name__}')
    if len(paths) != n:
        raise ValueError(f'paths must have one entry per embedding ({n}), got {len(paths)}')
    out: List[Optional[str]] = []
    for i, path in enumerate(paths):
        if path is None:
            out.append(None)
        elif isinstance(path, (str, os.PathLike)):
            out.append(os.fspath(path))
        else:
            raise TypeError(f'paths[{i}] must be a str, os.PathLike or None, got {type(path).__name__} {path!r}')
    return out


def _check_metadata(metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Return a JSON round-tripped copy of ``metadata`` (tuples become lists, as they will after a reload)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f'metadata must be a dict with str keys, got {type(metadata).__name__}')
    bad_keys = [k for k in metadata if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f'metadata keys must be str, got {bad_keys[:5]!r}')
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f'metadata must be JSON-serialisable (no NaN/inf): {exc}') from exc


class RetrievalIndex:
    """A faiss inner-product index over unit embeddings, with a label, a path and shared metadata per index.

    Build one with :meth:`build` or :meth:`load`; the constructor only wraps an existing faiss index. Item ids
    are positions in insertion order (``0 .. len(self) - 1``), also for the approximate index types.

    Index types (``score = <q, x>``, the cosine similarity of unit vectors):

    * ``'flat'``: ``faiss.IndexFlatIP``, exact search. No options.
    * ``'hnsw'``: ``faiss.IndexHNSWFlat`` (graph search, approximate). Options ``M`` (neighbours per node,
      default 32), ``ef_construction`` (default 40), ``ef_search`` (default 64; larger = higher recall, slower).
    * ``'ivf'``: ``IndexIVFFlat``, or ``IndexIVFPQ`` when ``pq_m`` is given (inverted lists, approximate). Options
      ``nlist`` (default ``max(1, min(4 * sqrt(N), N // 39))``), ``nprobe`` (lists scanned per query, default
      ``min(nlist, 16)``), ``pq_m`` (sub-quantisers, must divide the dim; None = no compression), ``pq_nbits``
      (bits per sub-quantiser code, default 8). Trained by k-means on the embeddings given to :meth:`build`,
      which therefore need at least ``nlist`` (and ``2^pq_nbits`` with PQ) rows.

    Args:
        index: A populated faiss index with ``metric_type == METRIC_INNER_PRODUCT``.
        index_type: One of :data:`INDEX_TYPES`, matching ``index``'s class.
        labels: One ``int`` or ``None`` per item.
        paths: One ``str`` or ``None`` per item.
        metadata: JSON-serialisable dict stored with the index, e.g. the model config that made the embeddings.
        params: The index type's options, as returned by :meth:`params`.
    """

    def __init__(
        self,
        index: Any,
        index_type: str,
        labels: Sequence[Optional[int]],
        paths: Sequence[Optional[str]],
        metadata: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f'index_type must be one of {INDEX_TYPES}, got {index_type!r}')
        if not isinstance(index, getattr(faiss, FAISS_CLASSES[index_type])):
            raise TypeError(
                f"index for index_type={index_type!r} must be a faiss.{FAISS_CLASSES[index_type]}, "
                f'got {type(index).__name__}'
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f'index must use faiss.METRIC_INNER_PRODUCT, got metric_type {index.metric_type}')
        self._index = index
        self._index_type = index_type
        self._labels = _check_labels(list(labels), index.ntotal)
        self._paths = _check_paths(list(paths), index.ntotal)
        self._metadata = _check_metadata(metadata)
        self._params = check_params(index, index_type, dict(params or {}))
        apply_search_params(index, index_type, self._params)

    @classmethod
    def build(
        cls,
        embeddings: ArrayLike,
        labels: Optional[Sequence[Optional[int]]] = None,
        paths: Optional[Sequence[Optional[PathLike]]] = None,
        index_type: str = 'flat',
        metadata: Optional[Mapping[str, Any]] = None,
        normalize: bool = False,
        **index_kwargs: Any,
    ) -> 'RetrievalIndex':
        """Build an index over ``embeddings`` (and train it, for ``'ivf'``).

        Args:
            embeddings: ``(N, D)`` unit-norm float tensor or array, ``N >= 1``.
            labels: ``N`` ints or Nones (or a 1-D integer array); None = no labels.
            paths: ``N`` str/PathLike or Nones; None = no paths.
            index_type: ``'flat'`` (exact, default), ``'hnsw'`` or ``'ivf'``; see the class docstring.
            metadata: JSON-serialisable dict saved with the index (e.g. the model config).
            normalize: L2-normalise the embeddings instead of requiring unit norm (see
                :func:`to_embedding_array`).
            **index_kwargs: The index type's options (see the class docstring); unknown ones raise TypeError.

        Returns:
            The populated index.
        """
        x = to_embedding_array(embeddings, 'embeddings', normalize)
        labels_list = _check_labels(labels, x.shape[0])
        paths_list = _check_paths(paths, x.shape[0])
        index, params = make_index(index_type, x.shape[1], x.shape[0], index_kwargs)
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, index_type, labels_list, paths_list, metadata, params)

    def add(
        self,
        embeddings: ArrayLike,
        labels: Optional[Sequence[Optional[int]]] = None,
        paths: Optional[Sequence[Optional[PathLike]]] = None,
        normalize: bool = False,
    ) -> None:
        """Append items; their ids continue from ``len(self)``. An IVF index keeps its trained centroids.

        Args:
            embeddings: ``(M, D)`` unit-norm float tensor or array with ``D == self.dim``.
            labels: ``M`` ints or Nones; None = no labels.
            paths: ``M`` str/PathLike or Nones; None = no paths.
            normalize: As in :meth:`build`.
        """
        x = self._check_queries(embeddings, 'embeddings', normalize)
        labels_list = _check_labels(labels, x.shape[0])
        paths_list = _check_paths(paths, x.shape[0])
        self._index.add(x)
        self._labels.extend(labels_list)
        self._paths.extend(paths_list)

    def search(self, queries: ArrayLike, k: int = 10, normalize: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by descending inner product ``<q, x>``.

        Args:
            queries: ``(Q, D)`` unit-norm float tensor or array.
            k: Number of neighbours, a positive int. Clipped to ``len(self)``, so the result has
                ``min(k, len(self))`` columns.
            normalize: As in :meth:`build`.

        Returns:
            ``(scores, ids)``: float32 and int64 arrays of shape ``(Q, min(k, len(self)))``, best first. An
            approximate index can find fewer than ``k`` items for a query (e.g. IVF with small ``nprobe``); those
            slots hold id ``-1`` and score ``-inf``.
        """
        x = self._check_queries(queries, 'queries', normalize)
        k = min(check_int(k, 'k'), len(self))
        scores, ids = self._index.search(x, k)
        scores[ids < 0] = -np.inf  # faiss fills missing slots with -FLT_MAX; -inf cannot be mistaken for a score
        return scores, ids

    def search_hits(self, queries: ArrayLike, k: int = 10, normalize: bool = False) -> List[List[SearchHit]]:
        """Like :meth:`search`, but one list of :class:`SearchHit` (id, score, label, path) per query.

        Missing slots of approximate indexes (id ``-1``) are dropped, so a list can be shorter than ``k``.
        """
        scores, ids = self.search(queries, k, normalize)
        return [
            [
                SearchHit(int(i), float(s), self._labels[i], self._paths[i])
                for s, i in zip(row_scores, row_ids)
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, ids)
        ]

    def set_search_params(self, **params: Any) -> None:
        """Change search-time options: ``ef_search`` for ``'hnsw'``, ``nprobe`` for ``'ivf'``; saved with the index."""
        allowed = {'hnsw': ('ef_search',), 'ivf': ('nprobe',)}.get(self._index_type, ())
        unknown = set(params) - set(allowed)
        if unknown:
            raise TypeError(
                f'index_type={self._index_type!r} search options are {list(allowed)}, got {sorted(unknown)}'
            )
        new = dict(self._params)
        for key, value in params.items():
            new[key] = check_int(value, key)
        if self._index_type == 'ivf' and new['nprobe'] > new['nlist']:
            raise ValueError(f"nprobe must be <= nlist ({new['nlist']}), got {new['nprobe']}")
        self._params = new
        apply_search_params(self._index, self._index_type, new)

    def _check_queries(self, x: ArrayLike, name: str, normalize: bool) -> np.ndarray:
        arr = to_embedding_array(x, name, normalize)
        if arr.shape[1] != self.dim:
            raise ValueError(f'{name} must have dim {self.dim} like the index, got shape {arr.shape}')
        return arr

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self._index.d)

    @property
    def index_type(self) -> str:
        """``'flat'``, ``'hnsw'`` or ``'ivf'``."""
        return self._index_type

    @property
    def metric(self) -> str:
        """Always ``'inner_product'`` (cosine similarity of unit vectors)."""
        return METRIC

    @property
    def params(self) -> Dict[str, Any]:
        """A copy of the index type's options (empty for ``'flat'``)."""
        return dict(self._params)

    @property
    def labels(self) -> List[Optional[int]]:
        """A copy of the per-item labels."""
        return list(self._labels)

    @property
    def paths(self) -> List[Optional[str]]:
        """A copy of the per-item paths."""
        return list(self._paths)

    @property
    def metadata(self) -> Dict[str, Any]:
        """A copy of the metadata dict."""
        return copy.deepcopy(self._metadata)

    @property
    def faiss_index(self) -> Any:
        """The wrapped faiss index (shared, not a copy: adding to it directly desynchronises labels and paths)."""
        return self._index

    def save(self, directory: PathLike) -> Path:
        """Save into ``directory`` (created if missing): a new faiss file, then ``index.json`` atomically.

        The faiss file is named ``index.<random hex>.faiss`` so it never overwrites the file the current
        ``index.json`` refers to; once the new ``index.json`` is in place the previous faiss file is deleted.
        A failure anywhere therefore leaves the previous save loadable.

        Returns:
            The directory as a Path.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        previous = self._referenced_file(directory)
        index_file = f'index.{uuid.uuid4().hex}.faiss'
        with atomic_path(directory / index_file) as tmp:
            faiss.write_index(self._index, str(tmp))
        try:
            info = {
                'format_version': FORMAT_VERSION,
                'index_file': index_file,
                'index_sha256': sha256(directory / index_file),
                'dim': self.dim,
                'count': len(self),
                'index_type': self._index_type,
                'metric': METRIC,
                'params': self._params,
                'labels': self._labels,
                'paths': self._paths,
                'metadata': self._metadata,
            }
            atomic_write_json(directory / METADATA_FILE, info)
        except BaseException:
            # the new faiss file is referenced by nothing: remove it, the previous pair stays intact
            (directory / index_file).unlink(missing_ok=True)
            raise
        if previous is not None and previous != index_file:
            (directory / previous).unlink(missing_ok=True)
        return directory

    @staticmethod
    def _referenced_file(directory: Path) -> Optional[str]:
        """Name of the faiss file the existing ``index.json`` refers to, if it is readable; else None."""
        try:
            name = json.loads((directory / METADATA_FILE).read_text(encoding='utf-8')).get('index_file')
        except (OSError, ValueError, AttributeError):
            return None
        return name if isinstance(name, str) and is_plain_file_name(name) else None

    @classmethod
    def load(cls, directory: PathLike, expected_metadata: Optional[Mapping[str, Any]] = None) -> 'RetrievalIndex':
        """Load an index saved by :meth:`save`, checking that all its parts agree.

        Checks: ``index.json`` parses and has the current format version and all fields; the faiss file exists,
        matches its recorded SHA-256 and reads; ``index.ntotal == count == len(labels) == len(paths)``;
        ``index.d == dim``; metric and faiss class match. With ``expected_metadata``, every key in it must be
        present in the stored metadata with an equal value (compared after a JSON round trip, so tuples equal
        lists); stored keys not in ``expected_metadata`` are ignored.

        Args:
            directory: The folder given to :meth:`save`.
            expected_metadata: Metadata the caller requires, e.g. the current model config.

        Raises:
            FileNotFoundError: ``index.json`` or the faiss file is missing (the message names the file).
            ValueError: a file is corrupt, the parts disagree, or the metadata differs (naming the fields).
        """
        directory = Path(directory)
        json_path = directory / METADATA_FILE
        if not json_path.is_file():
            raise FileNotFoundError(f'no saved index in {directory}: {json_path} does not exist')
        try:
            info = json.loads(json_path.read_text(encoding='utf-8'))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f'{json_path} is not valid JSON (corrupt index metadata): {exc}') from exc
        info = check_info(info, json_path)
        index_path = directory / info['index_file']
        if not index_path.is_file():
            raise FileNotFoundError(f'{json_path} refers to faiss file {index_path}, which does not exist')
        if sha256(index_path) != info['index_sha256']:
            raise ValueError(f'{index_path} does not match the SHA-256 recorded in {json_path} (corrupt or replaced)')
        try:
            index = faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise ValueError(f'{index_path} is not a readable faiss index: {exc}') from exc
        if index.ntotal != info['count']:
            raise ValueError(f'{index_path} holds {index.ntotal} vectors but {json_path} says count={info["count"]}')
        if index.d != info['dim']:
            raise ValueError(f'{index_path} has dim {index.d} but {json_path} says dim={info["dim"]}')
        if expected_metadata is not None:
            compare_metadata(info['metadata'], _check_metadata(expected_metadata), json_path)
        try:
            return cls(index, info['index_type'], info['labels'], info['paths'], info['metadata'], info['params'])
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{json_path} does not match {index_path}: {exc}') from exc


