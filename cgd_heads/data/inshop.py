"""Reader for DeepFashion In-shop Clothes Retrieval (Liu et al. 2016) from ``list_eval_partition.txt``.

The official file has the image count on line 1, the header ``image_name item_id evaluation_status`` on line 2,
then one row per image: path relative to the data set root (``img/WOMEN/Dresses/id_00000002/02_1_front.jpg``),
item id, and ``train``, ``query`` or ``gallery``. Retrieval matches query images to gallery images of the same
item, so those two splits share one label mapping (built over the union of their items).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ..utils.checks import PathLike
from .annotation_files import parse_field, read_rows, require_dir
from .image_list import ImageList

__all__ = ['read_inshop', 'find_inshop_partition', 'INSHOP_STATUSES']

INSHOP_STATUSES = ('train', 'query', 'gallery')
_HEADER = ['image_name', 'item_id', 'evaluation_status']
_PARTITION = 'list_eval_partition.txt'


def find_inshop_partition(root: PathLike) -> Path:
    """Return ``list_eval_partition.txt`` from ``root`` or ``root/Eval`` (where the official archive has it).

    Raises:
        FileNotFoundError: If neither has it.
    """
    root = require_dir(root, 'In-shop root')
    for candidate in (root / _PARTITION, root / 'Eval' / _PARTITION):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f'In-shop: no {_PARTITION} in {root} or {root / "Eval"}')


def read_inshop(root: PathLike) -> Dict[str, ImageList]:
    """Read In-shop Clothes Retrieval.

    Args:
        root: The data set root: it holds ``img/`` and ``list_eval_partition.txt`` (directly or in ``Eval/``).

    Returns:
        ``{'train': ..., 'query': ..., 'gallery': ...}`` with item ids as class names, sorted. 'query' and
        'gallery' share ``class_names`` (every item of either), so equal labels mean the same item; a shared
        class may have no image in one of the two.

    Raises:
        FileNotFoundError: If ``root`` or the partition file is missing.
        ValueError: If the file is malformed (wrong header, count that disagrees with the rows, unknown status).
    """
    root = require_dir(root, 'In-shop root')
    path = find_inshop_partition(root)
    with open(path, encoding='utf-8') as f:
        count_line, header_line = f.readline().strip(), f.readline().split()
    count = parse_field(count_line, int, path, 1, 'image count')
    if header_line != _HEADER:
        raise ValueError(f'{path}, line 2: expected the header {" ".join(_HEADER)!r}, got {" ".join(header_line)!r}')
    by_status: Dict[str, List[List[str]]] = {s: [] for s in INSHOP_STATUSES}
    rows = read_rows(path, 3, skip_lines=2)
    for lineno, (image, item, status) in rows:
        if status not in by_status:
            raise ValueError(f'{path}, line {lineno}: evaluation_status must be one of {INSHOP_STATUSES}, '
                             f'got {status!r}')
        by_status[status].append([str(root / image), item])
    if count != len(rows):
        raise ValueError(f'{path}: line 1 announces {count} images but {len(rows)} rows follow (truncated file?)')
    for status, entries in by_status.items():
        if not entries:
            raise ValueError(f'{path}: no image has evaluation_status {status!r}')
    eval_items = sorted({item for s in ('query', 'gallery') for _, item in by_status[s]})
    splits = {}
    for status, entries in by_status.items():
        names = None if status == 'train' else eval_items
        splits[status] = ImageList.from_class_names([p for p, _ in entries], [i for _, i in entries], names)
    return splits
