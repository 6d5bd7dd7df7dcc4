"""A persistent faiss index of L2-normalised embeddings with per-item labels, paths and model metadata.

Embeddings are unit vectors, so the inner product is the cosine similarity:

    score(q, x) = <q, x> = cos(q, x)        for ||q|| = ||x|| = 1

and every index type below is built with ``faiss.METRIC_INNER_PRODUCT`` (higher score = more similar).

On disk an index is a folder holding ``index.json`` (dim, count, index type, metric, search parameters, labels,
paths, metadata, format version, name and SHA-256 of the faiss file) and the faiss file it names, written by
``faiss.write_index``; an index with a whitening also holds the whitening's folder (``whitening.<hex>/``, written by
:meth:`Whitening.save <cgd_heads.retrieval.whitening.Whitening.save>`), named in ``index.json`` with its kind,
dims, model fingerprint and the SHA-256 of its ``whitening.json`` (format version 2). An IVF index whose inverted
lists live on disk (:func:`~cgd_heads.retrieval.unit_index.build_index_from_units` with ``on_disk=True``) also holds
its lists file ``index.<hex>.ivfdata``, named in ``index.json`` with its size (format version 3; see
:mod:`cgd_heads.retrieval.ondisk`). No pickle is involved anywhere. ``index.json`` is the commit point: the faiss
file and the whitening folder get fresh names on every save and are written first, so a save that fails at any step
leaves the previous ``index.json`` pointing at the previous, intact files.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..utils.atomic import atomic_path, atomic_write_json, read_json
from ..utils.checks import PathLike, check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import check_real
from .faiss_import import faiss
from .index_file import (FORMAT_VERSION, METADATA_FILE, METRIC, check_info, compare_metadata, format_version,
                         is_plain_file_name, sha256)
from .index_types import FAISS_CLASSES, INDEX_TYPES, apply_search_params, check_params, make_index
from .ondisk import is_on_disk, place_ivfdata, read_index_file, write_index_file
from .query_expansion import expansion_weights
from .whitening import METADATA_FILE as WHITENING_FILE
from .whitening import Whitening, model_fingerprint

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


def check_metadata(metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
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

    With a ``whitening``, the index stores whitened vectors (dim ``whitening.dim``) and takes embeddings of the
    model's dim (``input_dim``) everywhere: :meth:`add` and :meth:`search` whiten them first. The whitening is saved
    with the index and loaded with it.

    Args:
        index: A populated faiss index with ``metric_type == METRIC_INNER_PRODUCT``.
        index_type: One of :data:`INDEX_TYPES`, matching ``index``'s class.
        labels: One ``int`` or ``None`` per item.
        paths: One ``str`` or ``None`` per item.
        metadata: JSON-serialisable dict stored with the index, e.g. the model config that made the embeddings.
        params: The index type's options, as returned by :meth:`params`.
        whitening: The :class:`~cgd_heads.retrieval.whitening.Whitening` the stored vectors went through (its
            ``dim`` must be the index's), or None. When it records a model fingerprint and ``metadata`` has a
            ``'model'`` config, the two must agree.
    """

    def __init__(
        self,
        index: Any,
        index_type: str,
        labels: Sequence[Optional[int]],
        paths: Sequence[Optional[str]],
        metadata: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, Any]] = None,
        whitening: Optional[Whitening] = None,
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
        self._metadata = check_metadata(metadata)
        self._params = check_params(index, index_type, dict(params or {}))
        self._whitening = check_whitening(whitening, index.d, self._metadata)
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
        whitening: Optional[Whitening] = None,
        **index_kwargs: Any,
    ) -> 'RetrievalIndex':
        """Build an index over ``embeddings`` (and train it, for ``'ivf'``).

        Args:
            embeddings: ``(N, D)`` unit-norm float tensor or array, ``N >= 1`` (``D = whitening.input_dim`` with a
                whitening).
            labels: ``N`` ints or Nones (or a 1-D integer array); None = no labels.
            paths: ``N`` str/PathLike or Nones; None = no paths.
            index_type: ``'flat'`` (exact, default), ``'hnsw'`` or ``'ivf'``; see the class docstring.
            metadata: JSON-serialisable dict saved with the index (e.g. the model config).
            normalize: L2-normalise the embeddings instead of requiring unit norm (see
                :func:`to_embedding_array`).
            whitening: A fitted :class:`~cgd_heads.retrieval.whitening.Whitening` to store the embeddings through
                (and to apply to every later :meth:`add` and :meth:`search`), or None. If it records a model
                fingerprint and ``metadata`` has a ``'model'`` config, they must agree
                (:func:`~cgd_heads.retrieval.whitening.model_fingerprint`).
            **index_kwargs: The index type's options (see the class docstring); unknown ones raise TypeError.

        Returns:
            The populated index.
        """
        x = to_embedding_array(embeddings, 'embeddings', normalize)
        if whitening is not None:
            check_whitening(whitening, None, check_metadata(metadata))  # before any training
            x = _whiten(whitening, x, 'embeddings')
        labels_list = _check_labels(labels, x.shape[0])
        paths_list = _check_paths(paths, x.shape[0])
        index, params = make_index(index_type, x.shape[1], x.shape[0], index_kwargs)
        if not index.is_trained:
            index.train(x)
        index.add(x)
        return cls(index, index_type, labels_list, paths_list, metadata, params, whitening)

    def add(
        self,
        embeddings: ArrayLike,
        labels: Optional[Sequence[Optional[int]]] = None,
        paths: Optional[Sequence[Optional[PathLike]]] = None,
        normalize: bool = False,
    ) -> None:
        """Append items; their ids continue from ``len(self)``. An IVF index keeps its trained centroids.

        Args:
            embeddings: ``(M, D)`` unit-norm float tensor or array with ``D == self.input_dim``.
            labels: ``M`` ints or Nones; None = no labels.
            paths: ``M`` str/PathLike or Nones; None = no paths.
            normalize: As in :meth:`build`.
        """
        if is_on_disk(self._index):
            raise ValueError('this index keeps its inverted lists on disk and is read-only (adding would rewrite the '
                             'lists file that saved copies share): rebuild it with build_index_from_units')
        x = self._check_queries(embeddings, 'embeddings', normalize)
        labels_list = _check_labels(labels, x.shape[0])
        paths_list = _check_paths(paths, x.shape[0])
        self._index.add(x)
        self._labels.extend(labels_list)
        self._paths.extend(paths_list)

    def search(self, queries: ArrayLike, k: int = 10, normalize: bool = False, qe: int = 0,
               qe_alpha: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per query by descending inner product ``<q, x>``.

        With a whitening, the queries are whitened first. With ``qe > 0`` each (whitened) query is replaced by its
        alpha-QE ``normalise(q + sum_{i <= qe} w_i x_i)``, ``w_i = max(<q, x_i>, 0) ** qe_alpha`` (1 for
        ``qe_alpha = 0``), over its ``qe`` best items found by this index's own search (approximate for ``'hnsw'``
        and ``'ivf'``), and the expanded query is searched again (see
        :func:`~cgd_heads.retrieval.query_expansion.query_expansion`). The neighbour vectors are read back from the
        index with faiss ``reconstruct``: the stored vectors for ``'flat'``, ``'hnsw'`` and IVF-Flat, but for
        IVF-PQ (``pq_m`` set, codes only) their PQ reconstructions, i.e. approximate vectors. An IVF index needs a
        direct map (id -> list position) for that: it is made on the first QE search (8 bytes per item) and kept,
        also when saved.

        Args:
            queries: ``(Q, D)`` unit-norm float tensor or array (``D = input_dim``).
            k: Number of neighbours, a positive int. Clipped to ``len(self)``, so the result has
                ``min(k, len(self))`` columns.
            normalize: As in :meth:`build`.
            qe: Neighbours of query expansion, an int >= 0 (0 = none); clipped to ``len(self)``.
            qe_alpha: Exponent of the QE weights, a real >= 0.

        Returns:
            ``(scores, ids)``: float32 and int64 arrays of shape ``(Q, min(k, len(self)))``, best first (scores of
            the expanded queries with QE). An approximate index can find fewer than ``k`` items for a query (e.g.
            IVF with small ``nprobe``); those slots hold id ``-1`` and score ``-inf`` (and take no part in QE).
        """
        x = self._check_queries(queries, 'queries', normalize)
        k = min(check_int(k, 'k'), len(self))
        qe = min(check_int(qe, 'qe', minimum=0), len(self))
        qe_alpha = check_real(qe_alpha, 'qe_alpha', 0.0)
        if k == 0:  # an empty index (faiss asserts k > 0)
            return np.zeros((len(x), 0), dtype=np.float32), np.zeros((len(x), 0), dtype=np.int64)
        if qe > 0:
            x = self._expand(x, qe, qe_alpha)
        scores, ids = self._index.search(x, k)
        scores[ids < 0] = -np.inf  # faiss fills missing slots with -FLT_MAX; -inf cannot be mistaken for a score
        return scores, ids

    def search_hits(self, queries: ArrayLike, k: int = 10, normalize: bool = False, qe: int = 0,
                    qe_alpha: float = 0.0) -> List[List[SearchHit]]:
        """Like :meth:`search` (same arguments), but one list of :class:`SearchHit` (id, score, label, path) per
        query.

        Missing slots of approximate indexes (id ``-1``) are dropped, so a list can be shorter than ``k``.
        """
        scores, ids = self.search(queries, k, normalize, qe, qe_alpha)
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
        """The checked embeddings as the stored vectors are: whitened when the index has a whitening."""
        arr = to_embedding_array(x, name, normalize)
        if self._whitening is not None:
            return _whiten(self._whitening, arr, name)
        if arr.shape[1] != self.dim:
            raise ValueError(f'{name} must have dim {self.dim} like the index, got shape {arr.shape}')
        return arr

    def _expand(self, x: np.ndarray, qe: int, alpha: float) -> np.ndarray:
        """alpha-QE of the (whitened) queries over their ``qe`` best items of this index, vectors reconstructed."""
        scores, ids = self._index.search(x, qe)
        weights = expansion_weights(scores, alpha)
        weights[ids < 0] = 0.0  # slots an approximate search left empty
        total = x.astype(np.float64) + np.einsum('qn,qnd->qd', weights, self._reconstruct(ids))
        norms = np.linalg.norm(total, axis=1, keepdims=True)
        cancelled = norms[:, 0] <= 1e-6  # no direction left: keep the query (as query_expansion does)
        total[cancelled], norms[cancelled] = x[cancelled], 1.0
        return np.ascontiguousarray(total / norms, dtype=np.float32)

    def _reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """``(Q, n, dim)`` stored (IVF-PQ: decoded) vectors of ``ids``, zeros where an id is ``-1``."""
        if self._index_type == 'ivf':
            ivf = faiss.extract_index_ivf(self._index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()
        flat = ids.ravel()
        out = np.zeros((flat.size, self.dim), np.float32)
        valid = flat >= 0
        if valid.any():
            out[valid] = self._index.reconstruct_batch(flat[valid])
        return out.reshape(*ids.shape, self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Dimension of the stored vectors (the whitening's output dim when there is one)."""
        return int(self._index.d)

    @property
    def input_dim(self) -> int:
        """Dimension of the embeddings :meth:`add` and :meth:`search` take (``dim`` without a whitening)."""
        return self._whitening.input_dim if self._whitening is not None else self.dim

    @property
    def whitening(self) -> Optional[Whitening]:
        """The whitening applied to added and query embeddings, or None (shared, not a copy)."""
        return self._whitening

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
        """Save into ``directory`` (created if missing): a new faiss file (and whitening folder), then
        ``index.json`` atomically.

        The faiss file is named ``index.<random hex>.faiss`` (the whitening folder ``whitening.<random hex>``) so it
        never overwrites what the current ``index.json`` refers to; once the new ``index.json`` is in place the
        previous faiss file and whitening folder are deleted. A failure anywhere therefore leaves the previous save
        loadable.

        Returns:
            The directory as a Path.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        previous = _referenced_files(directory)
        index_file = f'index.{uuid.uuid4().hex}.faiss'
        created = [index_file]
        try:
            ivfdata = place_ivfdata(self._index, directory)
            if ivfdata is not None and ivfdata['file'] not in previous:
                created.append(ivfdata['file'])
            with atomic_path(directory / index_file) as tmp:
                write_index_file(self._index, tmp, ivfdata)
            info = {
                'format_version': format_version(self._whitening is not None, ivfdata is not None),
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
            if self._whitening is not None:
                created.append(f'whitening.{uuid.uuid4().hex}')
                info['whitening'] = _save_whitening(self._whitening, directory / created[-1])
            if ivfdata is not None:
                info['ivfdata'] = ivfdata
            atomic_write_json(directory / METADATA_FILE, info)
        except BaseException:
            # the new files are referenced by nothing: remove them, the previous save stays intact
            for name in created:
                _remove(directory / name)
            raise
        for name in previous - set(created) - {ivfdata and ivfdata['file']}:
            _remove(directory / name)
        return directory

    @classmethod
    def load(cls, directory: PathLike, expected_metadata: Optional[Mapping[str, Any]] = None) -> 'RetrievalIndex':
        """Load an index saved by :meth:`save`, checking that all its parts agree.

        Checks: ``index.json`` parses and has a known format version and all fields; the faiss file exists,
        matches its recorded SHA-256 and reads (an on-disk IVF index: its lists file is in ``directory`` with the
        recorded size, and is memory-mapped from there, so the folder can be moved);
        ``index.ntotal == count == len(labels) == len(paths)``; ``index.d == dim``; metric and faiss class match.
        With ``expected_metadata``, every key in it must be present in the stored metadata with an equal value
        (compared after a JSON round trip, so tuples equal lists); stored keys not in ``expected_metadata`` are
        ignored.

        Args:
            directory: The folder given to :meth:`save`.
            expected_metadata: Metadata the caller requires, e.g. the current model config.

        Raises:
            FileNotFoundError: ``index.json`` or the faiss file is missing (the message names the file).
            ValueError: a file is corrupt, the parts disagree, or the metadata differs (naming the fields).
        """
        directory = Path(directory)
        json_path = directory / METADATA_FILE
        info = check_info(read_json(json_path, 'index'), json_path)
        index_path = directory / info['index_file']
        if not index_path.is_file():
            raise FileNotFoundError(f'{json_path} refers to faiss file {index_path}, which does not exist')
        if sha256(index_path) != info['index_sha256']:
            raise ValueError(f'{index_path} does not match the SHA-256 recorded in {json_path} (corrupt or replaced)')
        try:
            index = read_index_file(index_path, info.get('ivfdata'), json_path)
        except RuntimeError as exc:
            raise ValueError(f'{index_path} is not a readable faiss index: {exc}') from exc
        if index.ntotal != info['count']:
            raise ValueError(f'{index_path} holds {index.ntotal} vectors but {json_path} says count={info["count"]}')
        if index.d != info['dim']:
            raise ValueError(f'{index_path} has dim {index.d} but {json_path} says dim={info["dim"]}')
        if expected_metadata is not None:
            compare_metadata(info['metadata'], check_metadata(expected_metadata), json_path)
        whitening = _load_whitening(directory, info['whitening'], json_path) if 'whitening' in info else None
        try:
            return cls(index, info['index_type'], info['labels'], info['paths'], info['metadata'], info['params'],
                       whitening)
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{json_path} does not match {index_path}: {exc}') from exc


def check_whitening(whitening: Optional[Whitening], dim: Optional[int],
                    metadata: Dict[str, Any]) -> Optional[Whitening]:
    """``whitening`` if it is None or a Whitening with output ``dim`` (None: any) whose fingerprint (if any) is the
    one of the model config in ``metadata['model']`` (if any)."""
    if whitening is None:
        return None
    if not isinstance(whitening, Whitening):
        raise TypeError(f'whitening must be a Whitening or None, got {type(whitening).__name__}')
    if dim is not None and whitening.dim != dim:
        raise ValueError(f'whitening has output dim {whitening.dim}, but the index stores {dim}-d vectors')
    model = metadata.get('model')
    if whitening.fingerprint is not None and isinstance(model, dict) \
            and whitening.fingerprint != model_fingerprint(model):
        raise ValueError(f'the whitening was learned for model fingerprint {whitening.fingerprint!r}, but the '
                         f'metadata model config has fingerprint {model_fingerprint(model)!r}: refit it on this '
                         "model's embeddings")
    return whitening


def _whiten(whitening: Whitening, x: np.ndarray, name: str) -> np.ndarray:
    if x.shape[1] != whitening.input_dim:
        raise ValueError(f'{name} must have dim {whitening.input_dim} like the index (the input dim of its '
                         f'whitening), got shape {x.shape}')
    return whitening.apply(x)


def _save_whitening(whitening: Whitening, folder: Path) -> Dict[str, Any]:
    """Write the whitening into ``folder``; return its ``index.json`` record."""
    whitening.save(folder)
    return {'folder': folder.name, 'sha256': sha256(folder / WHITENING_FILE), 'kind': whitening.kind,
            'dim': whitening.dim, 'input_dim': whitening.input_dim, 'fingerprint': whitening.fingerprint}


def _load_whitening(directory: Path, record: Dict[str, Any], json_path: Path) -> Whitening:
    """The whitening ``index.json`` names, after checking that its JSON is the one recorded."""
    folder = directory / record['folder']
    if not (folder / WHITENING_FILE).is_file():
        raise FileNotFoundError(f'{json_path} refers to the whitening folder {folder}, which holds no '
                                f'{WHITENING_FILE}')
    if sha256(folder / WHITENING_FILE) != record['sha256']:
        raise ValueError(f'{folder / WHITENING_FILE} does not match the SHA-256 recorded in {json_path} (corrupt '
                         'or replaced)')
    return Whitening.load(folder)


def _referenced_files(directory: Path) -> set:
    """Names of the faiss file and whitening folder the existing ``index.json`` refers to, if it is readable."""
    try:
        info = json.loads((directory / METADATA_FILE).read_text(encoding='utf-8'))
        names = {info.get('index_file'), (info.get('whitening') or {}).get('folder'),
                 (info.get('ivfdata') or {}).get('file')}
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if isinstance(n, str) and is_plain_file_name(n)}


def _remove(path: Path) -> None:
    """Delete a file, or a folder this module wrote (a whitening folder), if it exists."""
    if path.is_dir() and not path.is_symlink():
        if path.name.startswith('whitening.'):
            shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


