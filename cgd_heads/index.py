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
import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

try:
    import faiss
except ImportError as exc:  # faiss is a hard dependency: fail at import, not later as a NameError
    raise ImportError(
        'cgd_heads.index needs faiss for nearest-neighbour search: install it with `pip install faiss-cpu` '
        '(or faiss-gpu)'
    ) from exc

from .atomic import atomic_path, atomic_write_json

__all__ = [
    'RetrievalIndex',
    'SearchHit',
    'to_embedding_array',
    'INDEX_TYPES',
    'FORMAT_VERSION',
    'METADATA_FILE',
    'UNIT_NORM_TOLERANCE',
]

#: Index types :meth:`RetrievalIndex.build` accepts.
INDEX_TYPES = ('flat', 'hnsw', 'ivf')
#: Version of the ``index.json`` layout; :meth:`RetrievalIndex.load` refuses any other.
FORMAT_VERSION = 1
#: Name of the JSON file describing a saved index.
METADATA_FILE = 'index.json'
#: Largest accepted ``| ||x|| - 1 |`` for an embedding to count as unit norm. Loose enough for embeddings stored
#: in fp16/bf16 (rounding moves the norm by ~1e-4), tight enough to catch un-normalised ones (norms of 0.3 or 10).
UNIT_NORM_TOLERANCE = 1e-2

_METRIC = 'inner_product'
# Rows checked per block, so validating 100k x 1536 embeddings allocates only ~6 MB of temporaries at a time.
_CHECK_BLOCK_ROWS = 4096
_HNSW_DEFAULTS = {'M': 32, 'ef_construction': 40, 'ef_search': 64}
_IVF_KEYS = ('nlist', 'nprobe', 'pq_m', 'pq_nbits')

ArrayLike = Union[np.ndarray, torch.Tensor]
PathLike = Union[str, os.PathLike]


def to_embedding_array(x: Any, name: str = 'embeddings', normalize: bool = False) -> np.ndarray:
    """Validate an embedding matrix and return it as a C-contiguous float32 numpy array of unit rows.

    Args:
        x: 2-D torch tensor or numpy array of a floating dtype, shape ``(N, D)`` with ``N, D >= 1``. Tensors may
            live on any device and need no grad detaching.
        name: Argument name used in error messages.
        normalize: If True, return ``x / ||x||`` row-wise (a copy; a zero row raises). If False (default),
            every row must already satisfy ``| ||x|| - 1 | <= UNIT_NORM_TOLERANCE``; the rows are returned as
            they are, not renormalised.

    Returns:
        float32 array of shape ``(N, D)``; no copy when ``x`` already is a C-contiguous float32 numpy array of
        unit rows.

    Raises:
        TypeError: ``x`` is not a tensor/array or has a non-floating dtype.
        ValueError: wrong rank, empty, non-finite values, zero rows (``normalize=True``) or rows that are not
            unit norm (``normalize=False``).
    """
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f'{name} must have a floating dtype, got torch tensor of dtype {x.dtype}')
        # bf16 has no numpy equivalent; float32 is also what faiss computes in
        x = x.detach().to(device='cpu', dtype=torch.float32).numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype.kind != 'f':
            raise TypeError(f'{name} must have a floating dtype, got numpy array of dtype {x.dtype}')
    else:
        raise TypeError(f'{name} must be a torch.Tensor or numpy.ndarray of shape (N, D), got {type(x).__name__}')
    if x.ndim != 2:
        raise ValueError(f'{name} must be 2-D (N, D), got shape {tuple(x.shape)}')
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f'{name} must be non-empty, got shape {tuple(x.shape)}')
    # normalising works in place, so it gets its own copy: the caller's array (or the tensor whose memory
    # .numpy() shares) must not change
    x = np.array(x, dtype=np.float32, order='C', copy=True) if normalize else np.ascontiguousarray(x, np.float32)
    for start in range(0, x.shape[0], _CHECK_BLOCK_ROWS):
        block = x[start:start + _CHECK_BLOCK_ROWS]
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(f'{name} must be finite, row {bad} contains NaN or inf')
        # float32 sums of D squares err by <= D * 6e-8 (1e-4 for D = 1536), far inside the tolerance
        norms = np.sqrt(np.einsum('ij,ij->i', block, block))
        if normalize:
            if (norms == 0).any():
                bad = start + int(np.flatnonzero(norms == 0)[0])
                raise ValueError(f'{name} row {bad} is all zeros and cannot be L2-normalised')
            block[:] = block / norms[:, None]
        elif (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE).any():
            bad = start + int(np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)[0])
            raise ValueError(
                f'{name} must be L2-normalised (|norm - 1| <= {UNIT_NORM_TOLERANCE}), row {bad} has norm '
                f'{norms[bad - start]:.6g}; normalise them first or pass normalize=True'
            )
    return x


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


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f'{name} must be a positive int, got {type(value).__name__} {value!r}')
    if value < 1:
        raise ValueError(f'{name} must be a positive int, got {value!r}')
    return int(value)


def _make_index(index_type: str, dim: int, n_train: int, kwargs: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """Create an empty faiss inner-product index and return it with its full, defaults-filled parameters."""
    if index_type == 'flat':
        if kwargs:
            raise TypeError(f"index_type='flat' takes no index options, got {sorted(kwargs)}")
        return faiss.IndexFlatIP(dim), {}
    if index_type == 'hnsw':
        unknown = set(kwargs) - set(_HNSW_DEFAULTS)
        if unknown:
            raise TypeError(f"index_type='hnsw' options are {sorted(_HNSW_DEFAULTS)}, got unknown {sorted(unknown)}")
        params = {key: _check_positive_int(kwargs.get(key, default), key) for key, default in _HNSW_DEFAULTS.items()}
        index = faiss.IndexHNSWFlat(dim, params['M'], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params['ef_construction']
        return index, params
    if index_type == 'ivf':
        unknown = set(kwargs) - set(_IVF_KEYS)
        if unknown:
            raise TypeError(f"index_type='ivf' options are {list(_IVF_KEYS)}, got unknown {sorted(unknown)}")
        # faiss recommends >= 39 training vectors per centroid and ~4 * sqrt(N) lists; take the smaller
        default_nlist = max(1, min(int(4 * math.sqrt(n_train)), n_train // 39))
        nlist = _check_positive_int(kwargs.get('nlist', default_nlist), 'nlist')
        # faiss's default nprobe = 1 scans one list of nlist and loses much recall; 16 is a common compromise
        nprobe = _check_positive_int(kwargs.get('nprobe', min(nlist, 16)), 'nprobe')
        if nprobe > nlist:
            raise ValueError(f'nprobe must be <= nlist ({nlist}), got {nprobe}')
        pq_m = kwargs.get('pq_m')
        pq_nbits = _check_positive_int(kwargs.get('pq_nbits', 8), 'pq_nbits')
        min_train = nlist
        if pq_m is None:
            spec = f'IVF{nlist},Flat'
        else:
            pq_m = _check_positive_int(pq_m, 'pq_m')
            if dim % pq_m:
                raise ValueError(f'pq_m must divide the embedding dim {dim}, got {pq_m}')
            # each of the pq_m sub-quantisers is a k-means with 2^pq_nbits centroids
            min_train = max(nlist, 2 ** pq_nbits)
            spec = f'IVF{nlist},PQ{pq_m}x{pq_nbits}'
        if n_train < min_train:
            raise ValueError(
                f'too few embeddings to train an IVF index: got {n_train}, need at least {min_train} '
                f'(nlist={nlist}' + (f', 2^pq_nbits={2 ** pq_nbits})' if pq_m is not None else ')')
                + '; pass a smaller nlist or use index_type="flat"'
            )
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        if pq_m is not None:
            # the factory turns on polysemous training, which only serves Hamming-filtered search
            # (polysemous_ht > 0, never used here) and takes ~25x longer than the k-means itself
            faiss.downcast_index(index).do_polysemous_training = False
        return index, {'nlist': nlist, 'nprobe': nprobe, 'pq_m': pq_m, 'pq_nbits': pq_nbits}
    raise ValueError(f'index_type must be one of {INDEX_TYPES}, got {index_type!r}')


def _apply_search_params(index: Any, index_type: str, params: Dict[str, Any]) -> None:
    # search-time knobs: set on every build/load so a saved value is never silently replaced by faiss's default
    if index_type == 'hnsw':
        faiss.downcast_index(index).hnsw.efSearch = params['ef_search']
    elif index_type == 'ivf':
        faiss.extract_index_ivf(index).nprobe = params['nprobe']


def _check_params(index: Any, index_type: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """Check that ``params`` has exactly the index type's option keys, valid values, and agrees with ``index``."""
    keys = {'flat': (), 'hnsw': tuple(_HNSW_DEFAULTS), 'ivf': _IVF_KEYS}[index_type]
    if set(params) != set(keys):
        raise ValueError(f'params for index_type={index_type!r} must have keys {sorted(keys)}, got {params}')
    for key, value in params.items():
        if not (key == 'pq_m' and value is None):
            _check_positive_int(value, key)
    if index_type == 'ivf':
        nlist = faiss.extract_index_ivf(index).nlist
        if params['nlist'] != nlist:
            raise ValueError(f"params nlist={params['nlist']} but the faiss index has nlist={nlist}")
        if params['nprobe'] > nlist:
            raise ValueError(f"nprobe must be <= nlist ({nlist}), got {params['nprobe']}")
    return params


_FAISS_CLASSES = {'flat': 'IndexFlat', 'hnsw': 'IndexHNSW', 'ivf': 'IndexIVF'}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


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
        if not isinstance(index, getattr(faiss, _FAISS_CLASSES[index_type])):
            raise TypeError(
                f"index for index_type={index_type!r} must be a faiss.{_FAISS_CLASSES[index_type]}, "
                f'got {type(index).__name__}'
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f'index must use faiss.METRIC_INNER_PRODUCT, got metric_type {index.metric_type}')
        self._index = index
        self._index_type = index_type
        self._labels = _check_labels(list(labels), index.ntotal)
        self._paths = _check_paths(list(paths), index.ntotal)
        self._metadata = _check_metadata(metadata)
        self._params = _check_params(index, index_type, dict(params or {}))
        _apply_search_params(index, index_type, self._params)

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
        index, params = _make_index(index_type, x.shape[1], x.shape[0], index_kwargs)
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
        k = min(_check_positive_int(k, 'k'), len(self))
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
            new[key] = _check_positive_int(value, key)
        if self._index_type == 'ivf' and new['nprobe'] > new['nlist']:
            raise ValueError(f"nprobe must be <= nlist ({new['nlist']}), got {new['nprobe']}")
        self._params = new
        _apply_search_params(self._index, self._index_type, new)

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
        return _METRIC

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
                'index_sha256': _sha256(directory / index_file),
                'dim': self.dim,
                'count': len(self),
                'index_type': self._index_type,
                'metric': _METRIC,
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
        return name if isinstance(name, str) and _is_plain_file_name(name) else None

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
        info = _check_info(info, json_path)
        index_path = directory / info['index_file']
        if not index_path.is_file():
            raise FileNotFoundError(f'{json_path} refers to faiss file {index_path}, which does not exist')
        if _sha256(index_path) != info['index_sha256']:
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
            _compare_metadata(info['metadata'], _check_metadata(expected_metadata), json_path)
        try:
            return cls(index, info['index_type'], info['labels'], info['paths'], info['metadata'], info['params'])
        except (TypeError, ValueError) as exc:
            raise ValueError(f'{json_path} does not match {index_path}: {exc}') from exc


def _is_plain_file_name(name: str) -> bool:
    # index.json must only point inside its own folder
    return name not in ('', '.', '..') and os.path.basename(name) == name and '/' not in name and '\\' not in name


def _check_info(info: Any, json_path: Path) -> Dict[str, Any]:
    """Validate the structure of a parsed ``index.json``; errors name the file and the field."""
    if not isinstance(info, dict):
        raise ValueError(f'{json_path} must hold a JSON object, got {type(info).__name__}')
    version = info.get('format_version')
    if version != FORMAT_VERSION:
        raise ValueError(
            f'{json_path} has format_version {version!r}; this version of cgd_heads reads {FORMAT_VERSION}'
        )
    expected_types = {
        'index_file': str, 'index_sha256': str, 'dim': int, 'count': int, 'index_type': str, 'metric': str,
        'params': dict, 'labels': list, 'paths': list, 'metadata': dict,
    }
    for key, kind in expected_types.items():
        if key not in info:
            raise ValueError(f'{json_path} is missing the field {key!r}')
        if not isinstance(info[key], kind) or isinstance(info[key], bool):
            raise ValueError(f'{json_path} field {key!r} must be a {kind.__name__}, got {info[key]!r:.80}')
    if not _is_plain_file_name(info['index_file']):
        raise ValueError(
            f'{json_path} field index_file must be a file name in the same folder, got {info["index_file"]!r}'
        )
    if info['metric'] != _METRIC:
        raise ValueError(f'{json_path} field metric must be {_METRIC!r}, got {info["metric"]!r}')
    if info['index_type'] not in INDEX_TYPES:
        raise ValueError(f'{json_path} field index_type must be one of {INDEX_TYPES}, got {info["index_type"]!r}')
    for key in ('labels', 'paths'):
        if len(info[key]) != info['count']:
            raise ValueError(f'{json_path} has {len(info[key])} {key} but count={info["count"]}')
    return info


def _compare_metadata(stored: Dict[str, Any], expected: Dict[str, Any], json_path: Path) -> None:
    diffs = []
    for key, value in expected.items():
        if key not in stored:
            diffs.append(f'{key!r} (missing in the index, expected {value!r})')
        elif stored[key] != value:
            diffs.append(f'{key!r} (index has {stored[key]!r}, expected {value!r})')
    if diffs:
        raise ValueError(
            f'index in {json_path.parent} was built with different metadata; differing fields: ' + ', '.join(diffs)
        )
