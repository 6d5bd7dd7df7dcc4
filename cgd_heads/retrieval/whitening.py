"""Whitening of L2-normalised embeddings: PCA (optionally whitened, with shrinkage) and the supervised learned
whitening of Radenovic, Tolias, Chum ("Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018).

A whitening is a mean ``m`` (D,) and a projection ``P`` (D, d), both float32 numpy arrays, applied as

    x' = normalise((x - m) @ P),    normalise(v) = v / ||v||.

On disk it is a folder holding ``whitening.safetensors`` (``mean``, ``projection``) and ``whitening.json`` (kind,
dim, input dim, shrinkage, the fingerprint of the model it was learned for, and the SHA-256 of the safetensors
file). Each file is written atomically, the safetensors file first; ``whitening.json`` is the commit point, and
a save interrupted between the two is detected on load by the hash. No pickle is involved.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
import hashlib
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..utils.atomic import atomic_path, atomic_write_json, read_json
from ..utils.checks import PathLike, check_int
from .arrays import ArrayLike, to_embedding_array
from .checks import as_labels, check_real
from .index_file import sha256

__all__ = ['Whitening', 'model_fingerprint', 'WEIGHTS_FILE', 'METADATA_FILE', 'EIGENVALUE_FLOOR']

#: Tensor file of a saved whitening.
WEIGHTS_FILE = 'whitening.safetensors'
#: JSON file of a saved whitening (the commit point).
METADATA_FILE = 'whitening.json'
#: Eigenvalues below ``EIGENVALUE_FLOOR * largest`` are raised to it before any negative power, so directions the
#: data does not span (N <= D, duplicates) are amplified by at most 1e3 relative to the main one, not by 1e8.
EIGENVALUE_FLOOR = 1e-6
_FORMAT_VERSION = 1
_KINDS = ('pca', 'learned')


class Whitening:
    """A fitted whitening ``x' = normalise((x - mean) @ projection)``; build it with :meth:`fit_pca`,
    :meth:`fit_learned` or :meth:`load`.

    Attributes:
        mean: float32 ``(D,)`` array subtracted first.
        projection: float32 ``(D, dim)`` array; its columns are the output directions, most important first.
        kind: ``'pca'`` or ``'learned'``.
        shrinkage: Power on the eigenvalues in the whitening part (0 = rotation only, 1 = full whitening).
        fingerprint: Fingerprint of the model whose embeddings it was learned on (a str), or None.
    """

    def __init__(self, mean: np.ndarray, projection: np.ndarray, kind: str, shrinkage: float,
                 fingerprint: Optional[str] = None) -> None:
        if kind not in _KINDS:
            raise ValueError(f'kind must be one of {_KINDS}, got {kind!r}')
        mean, projection = np.asarray(mean), np.asarray(projection)
        if projection.ndim != 2 or mean.shape != (projection.shape[0],) or projection.shape[1] < 1:
            raise ValueError(f'mean must have shape (D,) and projection (D, dim) with dim >= 1, got '
                             f'{mean.shape} and {projection.shape}')
        if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
            raise ValueError('mean and projection must be finite')
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(projection, dtype=np.float32)
        self.kind = kind
        self.shrinkage = check_real(shrinkage, 'shrinkage', 0.0, 1.0)
        self.fingerprint = _check_fingerprint(fingerprint, 'fingerprint')

    @property
    def dim(self) -> int:
        """Output dimension d."""
        return int(self.projection.shape[1])

    @property
    def input_dim(self) -> int:
        """Input dimension D."""
        return int(self.projection.shape[0])

    def __repr__(self) -> str:
        return (f'Whitening(kind={self.kind!r}, input_dim={self.input_dim}, dim={self.dim}, '
                f'shrinkage={self.shrinkage}, fingerprint={self.fingerprint!r})')

    @classmethod
    def fit_pca(cls, embeddings: ArrayLike, dim: Optional[int] = None, whiten: bool = True, shrinkage: float = 1.0,
                normalize: bool = False) -> 'Whitening':
        """PCA of the centred embeddings, optionally whitened.

        With ``m = mean(x)``, ``C = (1/N) sum_i (x_i - m)(x_i - m)^T = U diag(lambda) U^T`` (eigenvalues in
        decreasing order, each raised to at least ``EIGENVALUE_FLOOR * lambda_1``), the projection is

            P = U[:, :dim] * lambda[:dim] ** (-s / 2),    s = shrinkage if whiten else 0

        (s = 0: plain PCA rotation; s = 1: full whitening; 0.5: half-way, a common shrinkage). Each column's
        sign is fixed so that its largest-magnitude entry is positive, which makes fits reproducible.

        Args:
            embeddings: ``(N, D)`` L2-normalised embeddings, ``N >= 2``.
            dim: Output dimension, ``1 <= dim <= D`` (None = D). Components beyond ``N - 1`` carry no variance
                of the fitting data; keep ``dim <= N - 1`` for a meaningful whitening.
            whiten: Scale the components (False = rotation only, ``shrinkage`` ignored and stored as 0).
            shrinkage: Power s in ``[0, 1]`` on the eigenvalues.
            normalize: L2-normalise the embeddings instead of requiring unit norm.

        Raises:
            TypeError: non-float embeddings, a non-int ``dim``, a non-bool ``whiten``, a non-real ``shrinkage``.
            ValueError: fewer than 2 vectors, non-finite or non-unit rows, ``dim`` outside ``[1, D]``,
                ``shrinkage`` outside ``[0, 1]``, or all vectors equal.
        """
        x, dim = _fit_inputs(embeddings, dim, normalize)
        if not isinstance(whiten, (bool, np.bool_)):
            raise TypeError(f'whiten must be a bool, got {type(whiten).__name__} {whiten!r}')
        power = check_real(shrinkage, 'shrinkage', 0.0, 1.0) if whiten else 0.0
        mean = x.mean(axis=0)
        centred = x - mean
        values, vectors = _sorted_eigh(centred.T @ centred / len(x), 'the covariance of embeddings')
        projection = vectors[:, :dim] * values[:dim] ** (-power / 2)
        return cls(mean, projection, 'pca', power)

    @classmethod
    def fit_learned(cls, embeddings: ArrayLike, labels: Any, dim: Optional[int] = None, shrinkage: float = 1.0,
                    normalize: bool = False) -> 'Whitening':
        """Supervised learned whitening (Radenovic et al. 2018): whiten matching pairs, then rotate by PCA of the
        non-matching pairs in the whitened space.

        With ``m`` the mean of *all* embeddings (not only of the matching-pair members), ``P_S`` the matching pairs
        (i < j, same label) and ``P_D`` the non-matching ones (i < j, different labels):

            C_S = (1/|P_S|) sum_{(i,j) in P_S} (x_i - x_j)(x_i - x_j)^T
            C_D = (1/|P_D|) sum_{(i,j) in P_D} (x_i - x_j)(x_i - x_j)^T
            W   = C_S^{-s/2}  (symmetric, s = shrinkage; eigenvalues floored as in :meth:`fit_pca`)
            W C_D W = V diag(mu) V^T,   mu decreasing
            P   = W V[:, :dim]

        Both sums run over *every* pair, none sampled: they are computed in closed form per class,
        ``sum_{i<j in c} (x_i - x_j)(x_i - x_j)^T = n_c X_c^T X_c - s_c s_c^T`` (``s_c`` the class sum), and
        ``C_D`` as all pairs minus matching pairs, in O(N D^2) time and O(D^2 + C D) memory. Column signs are
        fixed as in :meth:`fit_pca`. ``s = 1`` is the paper's full whitening; ``s < 1`` damps the amplification of
        directions in which the training classes barely vary, which do not carry over to unseen classes when the
        pairs come from few images per dimension (``s = 0`` is a rotation by the principal directions of
        non-matching differences).

        Args:
            embeddings: ``(N, D)`` L2-normalised embeddings, ``N >= 2``.
            labels: ``N`` class labels (ints or strs; tensor, array or sequence).
            dim: Output dimension, ``1 <= dim <= D`` (None = D).
            shrinkage: Power s in ``[0, 1]`` on the eigenvalues of ``C_S``.
            normalize: L2-normalise the embeddings instead of requiring unit norm.

        Raises:
            TypeError: non-float embeddings, float labels, a non-int ``dim``, a non-real ``shrinkage``.
            ValueError: as :meth:`fit_pca` (``shrinkage`` outside ``[0, 1]`` included); every label unique (no
                matching pair: ``C_S`` undefined); a single class (no non-matching pair: ``C_D`` undefined).
        """
        x, dim = _fit_inputs(embeddings, dim, normalize)
        power = check_real(shrinkage, 'shrinkage', 0.0, 1.0)
        match, non_match = _pair_covariances(x, as_labels(labels, len(x), 'labels'))
        values, vectors = _sorted_eigh(match, 'the covariance of matching-pair differences')
        whiten = (vectors * values ** (-power / 2)) @ vectors.T
        _, rotation = _sorted_eigh(whiten @ non_match @ whiten, 'the whitened non-matching covariance')
        return cls(x.mean(axis=0), whiten @ rotation[:, :dim], 'learned', power)

    def apply(self, x: ArrayLike, normalize: bool = False) -> np.ndarray:
        """``normalise((x - mean) @ projection)``: the whitened, L2-normalised ``(N, dim)`` float32 embeddings.

        Args:
            x: ``(N, D)`` L2-normalised embeddings of the model the whitening was fitted for.
            normalize: L2-normalise ``x`` first instead of requiring unit norm.

        Raises:
            TypeError: ``x`` is not a float tensor or array.
            ValueError: bad shape, non-finite or non-unit rows, a D other than ``input_dim``, or a row that the
                projection maps to zero (it has no direction).
        """
        x = to_embedding_array(x, 'x', normalize)
        if x.shape[1] != self.input_dim:
            raise ValueError(f'x must have {self.input_dim} columns (the whitening input dim), got shape {x.shape}')
        y = (x - self.mean) @ self.projection
        norms = np.linalg.norm(y, axis=1, keepdims=True)
        if (norms == 0).any():
            bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise ValueError(f'x row {bad} is mapped to the zero vector by the whitening and cannot be normalised')
        return np.ascontiguousarray(y / norms, dtype=np.float32)

    def save(self, directory: PathLike, fingerprint: Optional[str] = None) -> Path:
        """Write ``whitening.safetensors`` then ``whitening.json`` into ``directory`` (created if missing), each
        atomically; other files in the folder (a model checkpoint, say) are left alone.

        Args:
            directory: Destination folder.
            fingerprint: Fingerprint of the model the whitening belongs to, stored in the JSON; None stores
                ``self.fingerprint``. The object itself is not changed.

        Returns:
            The directory as a Path.
        """
        fingerprint = _check_fingerprint(fingerprint, 'fingerprint')
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file({'mean': self.mean, 'projection': self.projection}, str(tmp))
        atomic_write_json(directory / METADATA_FILE, {
            'format_version': _FORMAT_VERSION, 'kind': self.kind, 'dim': self.dim, 'input_dim': self.input_dim,
            'shrinkage': self.shrinkage, 'fingerprint': self.fingerprint if fingerprint is None else fingerprint,
            'weights_sha256': sha256(directory / WEIGHTS_FILE),
        })
        return directory

    @classmethod
    def load(cls, directory: PathLike, expected_fingerprint: Optional[str] = None) -> 'Whitening':
        """Load a whitening written by :meth:`save`, checking that its two files agree.

        Args:
            directory: The folder given to :meth:`save`.
            expected_fingerprint: Fingerprint of the model about to use it; if given, the stored one must be equal
                (a whitening saved without a fingerprint is refused too, since it cannot be verified).

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: corrupt or disagreeing files, or a fingerprint other than ``expected_fingerprint`` (the
                message names both).
        """
        directory = Path(directory)
        expected_fingerprint = _check_fingerprint(expected_fingerprint, 'expected_fingerprint')
        info = _read_info(directory)
        if expected_fingerprint is not None and info['fingerprint'] != expected_fingerprint:
            raise ValueError(
                f'the whitening in {directory} was learned for model fingerprint {info["fingerprint"]!r}, but '
                f'expected_fingerprint is {expected_fingerprint!r}; refit it on this model\'s embeddings'
            )
        mean, projection = _read_tensors(directory, info)
        return cls(mean, projection, info['kind'], info['shrinkage'], info['fingerprint'])


def model_fingerprint(model_config: Mapping[str, Any]) -> str:
    """The fingerprint a whitening learned on a model's embeddings records: ``'sha256:'`` and the SHA-256 of the
    model config as canonical JSON (sorted keys, no spaces).

    It identifies the model the way a saved index does (its metadata holds the same config, compared on load): the
    architecture and head settings, not the trained weights, so two runs of one configuration share it.

    Args:
        model_config: The config of a :class:`~cgd_heads.models.cgd_model.CGDModel` (``model.config``), a
            JSON-serialisable mapping.

    Raises:
        TypeError: ``model_config`` is not a mapping or not JSON-serialisable.
    """
    if not isinstance(model_config, Mapping):
        raise TypeError(f'model_config must be a dict, got {type(model_config).__name__}')
    try:
        text = json.dumps(_finite(dict(model_config)), sort_keys=True, separators=(',', ':'), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f'model_config must be JSON-serialisable: {exc}') from exc
    return 'sha256:' + hashlib.sha256(text.encode('utf-8')).hexdigest()


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats spelt as strings ('inf': MAC's p), so a config holding them can be hashed;
    finite values are untouched, so fingerprints of configs without them stay as they were."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _check_fingerprint(value: Any, name: str) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise TypeError(f'{name} must be a str or None, got {type(value).__name__} {value!r}')
    return value


def _fit_inputs(embeddings: ArrayLike, dim: Optional[int], normalize: bool) -> Tuple[np.ndarray, int]:
    """The embeddings as float64 (covariances of unit vectors lose ~3 digits in float32) and the checked dim."""
    x = to_embedding_array(embeddings, 'embeddings', normalize).astype(np.float64)
    if len(x) < 2:
        raise ValueError(f'embeddings must hold at least 2 vectors to fit a whitening, got {len(x)}')
    dim = check_int(dim, 'dim', allow_none=True)
    if dim is None:
        return x, x.shape[1]
    if dim > x.shape[1]:
        raise ValueError(f'dim must be at most the embedding dim {x.shape[1]} (or None), got {dim}')
    return x, dim


def _sorted_eigh(matrix: np.ndarray, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (decreasing, floored at ``EIGENVALUE_FLOOR * largest``) and eigenvectors (columns, each with
    its largest-magnitude entry positive) of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    values, vectors = values[::-1], vectors[:, ::-1]
    if not values[0] > 0:
        raise ValueError(f'{what} is zero (all vectors equal): there is no direction to fit')
    values = np.maximum(values, EIGENVALUE_FLOOR * values[0])
    signs = np.sign(vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])])
    return values, vectors * signs


def _pair_covariances(x: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(C_S, C_D)``: mean outer products of the differences over all matching / non-matching pairs i < j."""
    _, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    counts = np.bincount(codes)
    n = len(x)
    num_match = int((counts * (counts - 1) // 2).sum())
    num_non_match = n * (n - 1) // 2 - num_match
    if num_match == 0:
        raise ValueError('labels must contain at least one class with 2 or more embeddings (matching pairs); '
                         'every label is unique, so the matching-pair covariance is undefined')
    if num_non_match == 0:
        raise ValueError('labels must contain at least 2 classes (non-matching pairs); all embeddings share one '
                         'label, so the non-matching covariance is undefined')
    # differences do not depend on the origin: centring first keeps the closed-form sums well conditioned
    x = x - x.mean(axis=0)
    class_sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(class_sums, codes, x)
    # sum_{i<j in c} d d^T = n_c sum_i x_i x_i^T - s_c s_c^T, summed over classes
    match = (x * counts[codes][:, None]).T @ x - class_sums.T @ class_sums
    # all pairs: n sum_i x_i x_i^T - s s^T, with s = 0 after centring
    every = n * (x.T @ x)
    return match / num_match, (every - match) / num_non_match


def _read_info(directory: Path) -> Dict[str, Any]:
    """Parse and check ``whitening.json``; errors name the file and the field."""
    path = directory / METADATA_FILE
    info = read_json(path, 'whitening')
    if not isinstance(info, dict) or info.get('format_version') != _FORMAT_VERSION:
        raise ValueError(f'{path} must be a JSON object with format_version {_FORMAT_VERSION}')
    fields = {'kind': str, 'dim': int, 'input_dim': int, 'shrinkage': (int, float), 'weights_sha256': str,
              'fingerprint': (str, type(None))}
    for key, kind in fields.items():
        if key not in info or isinstance(info[key], bool) or not isinstance(info[key], kind):
            raise ValueError(f'{path} field {key!r} is missing or of the wrong type, got {info.get(key)!r:.80}')
    return info


def _read_tensors(directory: Path, info: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """``mean`` and ``projection`` from ``whitening.safetensors``, checked against the JSON."""
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f'{directory / METADATA_FILE} has no tensors beside it: {path} does not exist')
    if sha256(path) != info['weights_sha256']:
        raise ValueError(f'{path} does not match the SHA-256 recorded in {directory / METADATA_FILE} (an '
                         'interrupted save or a replaced file); save the whitening again')
    try:
        with safe_open(str(path), framework='numpy') as f:
            mean, projection = f.get_tensor('mean'), f.get_tensor('projection')
    except (SafetensorError, OSError, KeyError) as exc:
        raise ValueError(f'{path} is not a whitening tensor file ({exc})') from exc
    if projection.shape != (info['input_dim'], info['dim']) or mean.shape != (info['input_dim'],):
        raise ValueError(f'{path} holds mean {mean.shape} and projection {projection.shape}, but '
                         f'{directory / METADATA_FILE} says input_dim={info["input_dim"]}, dim={info["dim"]}')
    return mean, projection
