"""The on-disk layout of a saved index: ``index.json`` (the commit point) beside the faiss file it names, and the
checks that every part agrees before anything is loaded."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict

from .index_types import INDEX_TYPES

__all__ = ['FORMAT_VERSION', 'WHITENED_FORMAT_VERSION', 'ON_DISK_FORMAT_VERSION', 'METADATA_FILE', 'METRIC', 'sha256',
           'is_plain_file_name', 'check_info', 'compare_metadata', 'format_version']

#: Version of the ``index.json`` layout of an index without a whitening (unchanged since 0.1.0).
FORMAT_VERSION = 1
#: Version of the layout of an index that stores a whitening (an extra ``whitening`` field naming its folder):
#: versions that predate whitening refuse it instead of searching unwhitened queries against whitened vectors.
#: :meth:`RetrievalIndex.load` reads both and refuses any other.
WHITENED_FORMAT_VERSION = 2
#: Version of the layout of an IVF index whose inverted lists live in a file beside it (an extra ``ivfdata`` field
#: naming the file and its size; a ``whitening`` field as in version 2, when there is one): versions that predate it
#: refuse it instead of opening a lists file by a path recorded elsewhere.
ON_DISK_FORMAT_VERSION = 3
#: Name of the JSON file describing a saved index.
METADATA_FILE = 'index.json'
#: The only metric: inner product of unit vectors (cosine similarity).
METRIC = 'inner_product'


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def is_plain_file_name(name: str) -> bool:
    # index.json must only point inside its own folder
    return name not in ('', '.', '..') and os.path.basename(name) == name and '/' not in name and '\\' not in name


def check_info(info: Any, json_path: Path) -> Dict[str, Any]:
    """Validate the structure of a parsed ``index.json``; errors name the file and the field."""
    if not isinstance(info, dict):
        raise ValueError(f'{json_path} must hold a JSON object, got {type(info).__name__}')
    version = info.get('format_version')
    if version not in (FORMAT_VERSION, WHITENED_FORMAT_VERSION, ON_DISK_FORMAT_VERSION) or isinstance(version, bool):
        raise ValueError(
            f'{json_path} has format_version {version!r}; this version of cgd_heads reads {FORMAT_VERSION}, '
            f'{WHITENED_FORMAT_VERSION} and {ON_DISK_FORMAT_VERSION}'
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
    if not is_plain_file_name(info['index_file']):
        raise ValueError(
            f'{json_path} field index_file must be a file name in the same folder, got {info["index_file"]!r}'
        )
    if info['metric'] != METRIC:
        raise ValueError(f'{json_path} field metric must be {METRIC!r}, got {info["metric"]!r}')
    if info['index_type'] not in INDEX_TYPES:
        raise ValueError(f'{json_path} field index_type must be one of {INDEX_TYPES}, got {info["index_type"]!r}')
    for key in ('labels', 'paths'):
        if len(info[key]) != info['count']:
            raise ValueError(f'{json_path} has {len(info[key])} {key} but count={info["count"]}')
    _check_whitening_field(info, version, json_path)
    _check_ivfdata_field(info, version, json_path)
    return info


def format_version(whitened: bool, on_disk: bool) -> int:
    """The oldest layout version that holds an index with (or without) a whitening and on-disk lists."""
    if on_disk:
        return ON_DISK_FORMAT_VERSION
    return WHITENED_FORMAT_VERSION if whitened else FORMAT_VERSION


def _check_whitening_field(info: Dict[str, Any], version: int, json_path: Path) -> None:
    """Version 2 names its whitening folder (a plain name) and the SHA-256 of its JSON; version 1 has none;
    version 3 may have one."""
    record = info.get('whitening')
    if version == FORMAT_VERSION or (version == ON_DISK_FORMAT_VERSION and 'whitening' not in info):
        if record is not None:
            raise ValueError(f'{json_path} has a whitening field, which format_version {FORMAT_VERSION} cannot hold')
        return
    if not isinstance(record, dict) or not isinstance(record.get('folder'), str) \
            or not isinstance(record.get('sha256'), str):
        raise ValueError(f'{json_path} (format_version {version}) must have a whitening field with the str keys '
                         f'folder and sha256, got {record!r:.80}')
    if not is_plain_file_name(record['folder']):
        raise ValueError(f'{json_path} field whitening.folder must be a folder name in the same folder, got '
                         f'{record["folder"]!r}')


def _check_ivfdata_field(info: Dict[str, Any], version: int, json_path: Path) -> None:
    """Version 3 names its lists file (a plain name in the same folder) and its size; the others have none."""
    record = info.get('ivfdata')
    if version != ON_DISK_FORMAT_VERSION:
        if 'ivfdata' in info:
            raise ValueError(f'{json_path} has an ivfdata field, which format_version {version} cannot hold')
        return
    if not isinstance(record, dict) or not isinstance(record.get('file'), str) \
            or not isinstance(record.get('size'), int) or isinstance(record.get('size'), bool):
        raise ValueError(f'{json_path} (format_version {version}) must have an ivfdata field with a str file and an '
                         f'int size, got {record!r:.80}')
    if not is_plain_file_name(record['file']):
        raise ValueError(f'{json_path} field ivfdata.file must be a file name in the same folder, got '
                         f'{record["file"]!r}')
    if info['index_type'] != 'ivf':
        raise ValueError(f'{json_path} has on-disk inverted lists but index_type {info["index_type"]!r}')


def compare_metadata(stored: Dict[str, Any], expected: Dict[str, Any], json_path: Path) -> None:
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
