"""Embedding units: a gallery's embeddings cut into fixed work units, one file each, and the manifest that says what
made them.

A units folder holds ``manifest.json`` and ``unit-000000.safetensors``, ``unit-000001.safetensors``, ... Unit ``i``
covers the images ``i * unit_size .. min((i + 1) * unit_size, count) - 1`` of the image list, whatever the number of
processes that extract it, so an interrupted extraction can be finished by a different number of processes.

* ``manifest.json`` (written atomically, the same by every run on this folder): the format and its version, the model
  fingerprint (:func:`checkpoint_fingerprint` of the checkpoint folder, or :func:`weights_fingerprint` of a model in
  memory) and its config, the image list fingerprint (:func:`list_fingerprint`: SHA-256 of every path and label, in
  order), the image count, the preprocessing (data config, flip, scales, autocast dtype), ``unit_size`` and the
  number of units.
* Each unit (safetensors, written atomically, so a unit file is either complete or absent): float32 ``embeddings``
  ``(n, D)`` as the model made them (raw: no whitening; that is applied when indexing), int64 ``ids`` (positions in
  the image list, increasing) and int64 ``labels`` (:data:`NO_LABEL` for an unlabelled gallery); its header
  metadata holds the unit number and range, both fingerprints, the image paths (JSON) and the images left out
  because they could not be read (``skipped``, JSON ``[id, reason]`` pairs). ``n + len(skipped)`` is the unit's
  range length.

A unit file whose fingerprints differ from the manifest's is refused with a ValueError (it was written by another
model or for another list); an unreadable or inconsistent one counts as not finished and is written again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..models.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..utils.atomic import atomic_path, atomic_write_json, read_json, resolve_dir
from ..utils.checks import PathLike, check_int

__all__ = ['EmbeddingUnit', 'EmbeddingUnits', 'load_units', 'checkpoint_fingerprint', 'weights_fingerprint',
           'list_fingerprint', 'MANIFEST_FILE', 'DEFAULT_UNIT_SIZE', 'UNITS_FORMAT_VERSION', 'NO_LABEL']

_logger = logging.getLogger(__name__)

#: Name of the manifest in a units folder.
MANIFEST_FILE = 'manifest.json'
#: Images per unit unless told otherwise: 10,000 x 512-d float32 is 20 MB per unit.
DEFAULT_UNIT_SIZE = 10_000
#: Version of the units layout (manifest and unit files).
UNITS_FORMAT_VERSION = 1
UNITS_FORMAT = 'cgd_heads.embedding_units'
#: The label stored for an image without one (an unlabelled gallery); real labels are >= 0, and an index built from
#: the units gets ``None`` for it.
NO_LABEL = -1
#: The manifest fields a rerun must agree with, and what a difference means.
_COMPARED = {
    'model_fingerprint': 'another model',
    'list_fingerprint': 'another image list (other paths, or other labels: e.g. labelled vs unlabelled)',
    'count': 'another image list (other paths, or other labels: e.g. labelled vs unlabelled)',
    'preprocessing': 'other preprocessing',
    'unit_size': 'another unit size',
}


def _hash_file(digest: Any, path: Path) -> None:
    digest.update(f'{path.name}\0{path.stat().st_size}\0'.encode())
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)


def checkpoint_fingerprint(directory: PathLike) -> str:
    """``'checkpoint-sha256:'`` + the SHA-256 of a checkpoint folder's ``config.json`` and ``model.safetensors``.

    Two checkpoints share it only if both files are byte for byte the same: the weights and the config (model
    architecture, data config) that made them.

    Args:
        directory: A checkpoint folder written by :func:`~cgd_heads.models.checkpoint.save_pretrained`.

    Raises:
        FileNotFoundError: one of the two files is missing.
    """
    directory = resolve_dir(directory)
    digest = hashlib.sha256(b'cgd_heads checkpoint\0')
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f'{directory} is not a checkpoint folder: {directory / name} does not exist')
        _hash_file(digest, directory / name)
    return 'checkpoint-sha256:' + digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """``'weights-sha256:'`` + the SHA-256 of a model's config (``model.config``, if any) and every tensor of its
    state dict (name, dtype, shape and bytes), for a model that is not (or not yet) a checkpoint folder.

    It differs from the :func:`checkpoint_fingerprint` of the same model saved: units are refused across the two.

    Args:
        model: Any ``torch.nn.Module``.
    """
    digest = hashlib.sha256(b'cgd_heads weights\0')
    digest.update(json.dumps(getattr(model, 'config', None), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f'\0{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0'.encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return 'weights-sha256:' + digest.hexdigest()


def list_fingerprint(paths: Sequence[Optional[str]], labels: Sequence[int]) -> str:
    """``'sha256:'`` + the SHA-256 of an image list: every ``[path, label]`` pair, in order.

    Args:
        paths: One path (or None) per image.
        labels: One int label per image.
    """
    if len(paths) != len(labels):
        raise ValueError(f'paths and labels must have the same length, got {len(paths)} and {len(labels)}')
    digest = hashlib.sha256(b'cgd_heads image list\0')
    for path, label in zip(paths, labels):
        digest.update(json.dumps([None if path is None else str(path), int(label)]).encode() + b'\n')
    return 'sha256:' + digest.hexdigest()


@dataclass(frozen=True)
class EmbeddingUnit:
    """One unit as read back: ``ids`` (int64, positions in the image list), float32 ``embeddings`` ``(n, D)``,
    int64 ``labels``, ``paths`` (a str or None each) and the ``skipped`` ``(id, reason)`` pairs."""

    index: int
    ids: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray
    paths: List[Optional[str]]
    skipped: List[Tuple[int, str]]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def item_labels(self) -> List[Optional[int]]:
        """The labels as an index stores them: an int each, ``None`` for :data:`NO_LABEL`."""
        return [None if label == NO_LABEL else label for label in self.labels.tolist()]


def _read_json(path: Path) -> Dict[str, Any]:
    value = read_json(path, 'units manifest')
    if not isinstance(value, dict) or value.get('format') != UNITS_FORMAT:
        raise ValueError(f'{path} is not a manifest of embedding units (format {UNITS_FORMAT!r})')
    if value.get('format_version') != UNITS_FORMAT_VERSION:
        raise ValueError(f'{path} has format_version {value.get("format_version")!r}; this version of cgd_heads '
                         f'reads {UNITS_FORMAT_VERSION}')
    return value


class EmbeddingUnits:
    """A folder of embedding units and its manifest (see the module docstring for the layout).

    Make one with :meth:`create` (writes or checks the manifest) or :meth:`open` (reads it); fill it with
    :meth:`write_unit` (or :func:`~cgd_heads.retrieval.distributed_extract.extract_units`), read it one unit at a time
    with :meth:`iter_units`, or all at once with :meth:`load`.

    Args:
        directory: The units folder.
        manifest: Its parsed ``manifest.json``.
    """

    def __init__(self, directory: PathLike, manifest: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self._manifest = json.loads(json.dumps(dict(manifest)))

    @classmethod
    def create(cls, directory: PathLike, count: int, unit_size: int, model_fingerprint: str, list_fingerprint: str,
               preprocessing: Optional[Mapping[str, Any]] = None, model_config: Optional[Mapping[str, Any]] = None,
               class_names: Optional[Sequence[str]] = None) -> 'EmbeddingUnits':
        """The units folder ``directory`` for these images and model: writes its manifest, or, when the folder
        already has one, checks that it was written for the same model, list, preprocessing and unit size.

        Args:
            directory: The units folder (created if missing).
            count: Number of images in the list.
            unit_size: Images per unit.
            model_fingerprint: :func:`checkpoint_fingerprint` or :func:`weights_fingerprint` of the model.
            list_fingerprint: :func:`list_fingerprint` of the image list.
            preprocessing: JSON-serialisable record of how images become embeddings (data config, flip, scales...).
            model_config: The model's config, recorded for the index metadata (not compared: the fingerprint is).
            class_names: The name of each label, recorded for the index metadata (not compared).

        Raises:
            ValueError: the folder's manifest differs (naming the fields: another model, another image list, other
                preprocessing, another unit size).
        """
        count = check_int(count, 'count')
        unit_size = check_int(unit_size, 'unit_size')
        directory = Path(directory)
        manifest = {
            'format': UNITS_FORMAT, 'format_version': UNITS_FORMAT_VERSION, 'count': count, 'unit_size': unit_size,
            'num_units': math.ceil(count / unit_size), 'model_fingerprint': str(model_fingerprint),
            'list_fingerprint': str(list_fingerprint), 'preprocessing': dict(preprocessing or {}),
            'model': None if model_config is None else dict(model_config),
            'class_names': None if class_names is None else [str(name) for name in class_names],
        }
        manifest = json.loads(json.dumps(manifest, allow_nan=False))  # what a reload will see (tuples -> lists)
        path = directory / MANIFEST_FILE
        if path.is_file():
            _compare_manifests(_read_json(path), manifest, path)
            return cls(directory, _read_json(path))
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, manifest)
        return cls(directory, manifest)

    @classmethod
    def open(cls, directory: PathLike) -> 'EmbeddingUnits':
        """Open an existing units folder (its manifest must be there; the units need not all be finished)."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f'{directory} is not a units folder: {path} does not exist')
        return cls(directory, _read_json(path))

    @property
    def manifest(self) -> Dict[str, Any]:
        """A copy of the manifest."""
        return json.loads(json.dumps(self._manifest))

    @property
    def count(self) -> int:
        """Number of images of the list (embedded or skipped)."""
        return int(self._manifest['count'])

    @property
    def unit_size(self) -> int:
        """Images per unit (the last unit may hold fewer)."""
        return int(self._manifest['unit_size'])

    @property
    def num_units(self) -> int:
        """Number of units, ``ceil(count / unit_size)``."""
        return int(self._manifest['num_units'])

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint of the model that makes the embeddings."""
        return self._manifest['model_fingerprint']

    @property
    def list_fingerprint(self) -> str:
        """The fingerprint of the image list."""
        return self._manifest['list_fingerprint']

    @property
    def model_config(self) -> Optional[Dict[str, Any]]:
        """The model config recorded in the manifest, or None."""
        return self.manifest.get('model')

    @property
    def class_names(self) -> Optional[List[str]]:
        """The class names recorded in the manifest (``class_names[label]``), or None."""
        return self.manifest.get('class_names')

    def __len__(self) -> int:
        return self.num_units

    def unit_range(self, unit: int) -> Tuple[int, int]:
        """``(start, stop)``: the image positions of ``unit``, ``start <= id < stop``.

        Args:
            unit: The unit number, ``0 <= unit < num_units``.
        """
        unit = check_int(unit, 'unit', minimum=0)
        if unit >= self.num_units:
            raise ValueError(f'unit must be < num_units ({self.num_units}), got {unit}')
        return unit * self.unit_size, min((unit + 1) * self.unit_size, self.count)

    def unit_path(self, unit: int) -> Path:
        """The file of ``unit``: ``unit-<6+ digits>.safetensors`` in the folder.

        Args:
            unit: The unit number.
        """
        return self.directory / f'unit-{unit:06d}.safetensors'

    def write_unit(self, unit: int, embeddings: Any, labels: Sequence[int],
                   paths: Optional[Sequence[Optional[str]]] = None, ids: Optional[Sequence[int]] = None,
                   skipped: Optional[Sequence[Tuple[int, str]]] = None, writer: Optional[str] = None) -> Path:
        """Write one unit atomically (a crash leaves either the complete file or none).

        Args:
            unit: The unit number.
            embeddings: ``(n, D)`` float array or tensor, raw model output.
            labels: ``n`` int labels (:data:`NO_LABEL` where an image has none).
            paths: ``n`` paths (or Nones); None = no paths.
            ids: The ``n`` image positions, increasing, within :meth:`unit_range`; None = the whole range.
            skipped: ``(id, reason)`` of the images of the range left out (unreadable); together with ``ids``
                they must cover the range exactly once.
            writer: Who wrote it (e.g. ``'rank 1 of 4'``), kept in the header metadata for the record.

        Returns:
            The unit's path.
        """
        start, stop = self.unit_range(unit)
        tensors, skipped_list = _unit_tensors(embeddings, labels, ids, skipped, start, stop)
        n = tensors['ids'].shape[0]
        if n:  # every unit of a folder holds vectors of one dimension (an index concatenates them)
            try:
                dim = self.dim
            except ValueError:
                dim = None  # no unit with embeddings yet: this one sets the dimension
            if dim is not None and tensors['embeddings'].shape[1] != dim:
                raise ValueError(f'unit {unit} holds {tensors["embeddings"].shape[1]}-d embeddings, but the units of '
                                 f'{self.directory} hold {dim}-d ones')
        paths_list = [None] * n if paths is None else [None if p is None else str(p) for p in paths]
        if len(paths_list) != n:
            raise ValueError(f'paths must have one entry per embedding ({n}), got {len(paths_list)}')
        metadata = {'format': UNITS_FORMAT, 'unit': str(unit), 'start': str(start), 'stop': str(stop),
                    'model_fingerprint': self.model_fingerprint, 'list_fingerprint': self.list_fingerprint,
                    'paths': json.dumps(paths_list), 'skipped': json.dumps(skipped_list), 'writer': str(writer)}
        path = self.unit_path(unit)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    def is_finished(self, unit: int) -> bool:
        """Whether ``unit``'s file is there, readable and complete (read from its header only).

        Args:
            unit: The unit number.

        Raises:
            ValueError: the file was written by another model or for another image list.
        """
        path = self.unit_path(unit)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework='np') as f:
                meta = f.metadata() or {}
                shapes = {key: f.get_slice(key).get_shape() for key in ('embeddings', 'ids', 'labels')}
            skipped = json.loads(meta.get('skipped', '[]'))
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            _logger.warning('unit file %s is unreadable (%s): it will be written again', path, exc)
            return False
        for key, what in (('model_fingerprint', 'another model'), ('list_fingerprint', 'another image list')):
            if meta.get(key) != self._manifest[key]:
                raise ValueError(f'{path} was written by {what} ({key} {meta.get(key)!r}, the manifest has '
                                 f'{self._manifest[key]!r}): delete it or extract into a new folder')
        start, stop = self.unit_range(unit)
        n = shapes['ids'][0]
        if meta.get('unit') != str(unit) or meta.get('start') != str(start) or meta.get('stop') != str(stop) \
                or n + len(skipped) != stop - start or shapes['embeddings'][0] != n or shapes['labels'][0] != n:
            _logger.warning('unit file %s does not hold unit %d complete: it will be written again', path, unit)
            return False
        return True

    def missing_units(self) -> List[int]:
        """The units not finished yet (see :meth:`is_finished`), in order."""
        return [u for u in range(self.num_units) if not self.is_finished(u)]

    def check_complete(self) -> None:
        """Raise ValueError unless every unit is finished."""
        missing = self.missing_units()
        if missing:
            raise ValueError(f'{self.directory} is missing {len(missing)} of {self.num_units} units (e.g. unit '
                             f'{missing[0]}): finish the extraction (rerun it; finished units are kept)')

    def clean_temporary(self) -> int:
        """Delete the temporary files of unit writes a killed process left behind; return how many."""
        stale = list(self.directory.glob('.unit-*.safetensors.*.tmp'))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def read_unit(self, unit: int) -> EmbeddingUnit:
        """Read one unit (it must be finished).

        Args:
            unit: The unit number.
        """
        path = self.unit_path(unit)
        if not self.is_finished(unit):
            raise ValueError(f'unit {unit} of {self.directory} is not finished ({path})')
        with safe_open(str(path), framework='np') as f:
            meta = f.metadata() or {}
            arrays = {key: f.get_tensor(key) for key in ('embeddings', 'ids', 'labels')}
        skipped = [(int(i), str(reason)) for i, reason in json.loads(meta.get('skipped', '[]'))]
        return EmbeddingUnit(unit, arrays['ids'], arrays['embeddings'], arrays['labels'],
                             json.loads(meta.get('paths', 'null')) or [None] * len(arrays['ids']), skipped)

    def iter_units(self, units: Optional[Sequence[int]] = None) -> Iterator[EmbeddingUnit]:
        """Yield the units in order (or the given ones), one file in memory at a time.

        Args:
            units: The unit numbers to read, in this order; None = all of them.
        """
        for unit in range(self.num_units) if units is None else units:
            yield self.read_unit(unit)

    def __iter__(self) -> Iterator[EmbeddingUnit]:
        return self.iter_units()

    def unit_counts(self) -> List[int]:
        """Embeddings in each unit (from the file headers; every unit must be finished)."""
        self.check_complete()
        counts = []
        for unit in range(self.num_units):
            with safe_open(str(self.unit_path(unit)), framework='np') as f:
                counts.append(int(f.get_slice('ids').get_shape()[0]))
        return counts

    @property
    def dim(self) -> int:
        """Dimension of the embeddings (from the first non-empty unit's header)."""
        for unit in range(self.num_units):
            if self.is_finished(unit):
                with safe_open(str(self.unit_path(unit)), framework='np') as f:
                    shape = f.get_slice('embeddings').get_shape()
                if shape[0]:
                    return int(shape[1])
        raise ValueError(f'{self.directory} has no finished unit with embeddings: the dimension is unknown')

    def load(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Optional[str]], Dict[str, Any]]:
        """Gather every unit: ``(embeddings, labels, paths, manifest)``, like
        :func:`~cgd_heads.retrieval.extract.load_embeddings` (float32 ``(N, D)``, int64 ``(N,)``), in id order;
        ``labels`` is None when every image has :data:`NO_LABEL` (an unlabelled gallery: as one class it would
        make every retrieval "correct").

        Holds all the embeddings in memory (``4 N D`` bytes); iterate :meth:`iter_units` to stream instead.
        """
        counts = self.unit_counts()
        dim = self.dim
        embeddings = torch.empty((sum(counts), dim), dtype=torch.float32)
        labels = torch.empty(sum(counts), dtype=torch.long)
        paths: List[Optional[str]] = []
        offset = 0
        for unit in self.iter_units():
            n = len(unit)
            if n:
                if unit.embeddings.shape[1] != dim:
                    raise ValueError(f'unit {unit.index} of {self.directory} has dim {unit.embeddings.shape[1]}, '
                                     f'the others {dim}')
                embeddings[offset:offset + n] = torch.from_numpy(unit.embeddings)
                labels[offset:offset + n] = torch.from_numpy(unit.labels)
            paths.extend(unit.paths)
            offset += n
        unlabelled = offset > 0 and bool((labels == NO_LABEL).all())
        return embeddings, None if unlabelled else labels, paths, self.manifest


def load_units(directory: PathLike
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Optional[str]], Dict[str, Any]]:
    """Gather a complete units folder into memory: ``(embeddings, labels, paths, manifest)``, in id order
    (``labels`` None when no image has one, see :meth:`EmbeddingUnits.load`).

    Args:
        directory: A units folder (:func:`~cgd_heads.retrieval.distributed_extract.extract_units`).

    Raises:
        ValueError: a unit is missing or foreign.
    """
    return EmbeddingUnits.open(directory).load()


def _compare_manifests(stored: Dict[str, Any], wanted: Dict[str, Any], path: Path) -> None:
    differing = [key for key in _COMPARED if stored.get(key) != wanted[key]]
    diffs = [f'{key} (folder: {stored.get(key)!r:.60}, this run: {wanted[key]!r:.60})' for key in differing]
    if diffs:
        reasons = list(dict.fromkeys(_COMPARED[key] for key in differing))
        raise ValueError(f'{path.parent} holds units written for {" and ".join(reasons)}: differing '
                         + '; '.join(diffs) + '. Extract into a new folder (or delete this one)')


def _unit_tensors(embeddings: Any, labels: Sequence[int], ids: Optional[Sequence[int]],
                  skipped: Optional[Sequence[Tuple[int, str]]], start: int,
                  stop: int) -> Tuple[Dict[str, np.ndarray], List[List[Any]]]:
    """The checked arrays of a unit and its ``skipped`` list."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().float().numpy()
    emb = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if emb.ndim != 2:
        raise ValueError(f'embeddings must be (n, D), got shape {emb.shape}')
    ids_arr = np.arange(start, stop, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
    labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels_arr.size and labels_arr.min() < NO_LABEL:
        raise ValueError(f'labels must be >= 0, or NO_LABEL ({NO_LABEL}) for an image without one, got '
                         f'{int(labels_arr.min())}')
    if not (emb.shape[0] == ids_arr.shape[0] == labels_arr.shape[0]):
        raise ValueError(f'embeddings, ids and labels must have one row per image, got {emb.shape[0]}, '
                         f'{ids_arr.shape[0]} and {labels_arr.shape[0]}')
    skipped_list = [[int(i), str(reason)] for i, reason in (skipped or [])]
    covered = sorted(ids_arr.tolist() + [i for i, _ in skipped_list])
    if covered != list(range(start, stop)) or np.any(np.diff(ids_arr) <= 0):
        raise ValueError(f'ids (increasing) and skipped ids must cover the unit range [{start}, {stop}) exactly once')
    return {'embeddings': emb, 'ids': ids_arr, 'labels': labels_arr}, skipped_list
