"""Reader for Stanford Online Products (Oh Song et al. 2016) from its official ``Ebay_train.txt``/``Ebay_test.txt``.

Each file starts with the header ``image_id class_id super_class_id path`` followed by one row per image, the
path relative to the data set root (``bicycle_final/111085122871_0.JPG``). The official split is already by
class (11,318 training products, 11,316 unseen test products).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..utils.checks import PathLike
from .annotation_files import parse_field, read_rows, require_dir, require_file
from .image_list import ImageList

__all__ = ['read_sop', 'SOP_HEADER']

SOP_HEADER = ('image_id', 'class_id', 'super_class_id', 'path')


def _read_split(root: Path, path: Path) -> ImageList:
    with open(path, encoding='utf-8') as f:
        header = f.readline().split()
    if tuple(header) != SOP_HEADER:
        raise ValueError(f'{path}: first line must be the header {" ".join(SOP_HEADER)!r}, got {" ".join(header)!r}')
    class_ids, paths = [], []
    for lineno, fields in read_rows(path, len(SOP_HEADER), skip_lines=1):
        class_ids.append(parse_field(fields[1], int, path, lineno, 'class_id'))
        paths.append(str(root / fields[3]))
    if not paths:
        raise ValueError(f'{path}: no image rows after the header')
    # names are the official class ids; sorting them as ints keeps labels in class-id order
    order = sorted(set(class_ids))
    return ImageList.from_class_names(paths, [str(c) for c in class_ids], [str(c) for c in order])


def read_sop(root: PathLike) -> Dict[str, ImageList]:
    """Read Stanford Online Products.

    Args:
        root: The ``Stanford_Online_Products`` folder (holding ``Ebay_train.txt``, ``Ebay_test.txt`` and the
            ``*_final`` image folders).

    Returns:
        ``{'train': ..., 'test': ...}``; class names are the official ``class_id`` values as strings, labels in
        class-id order.

    Raises:
        FileNotFoundError: If ``root`` or a list file is missing.
        ValueError: If a list file is malformed.
    """
    root = require_dir(root, 'Stanford Online Products root')
    return {split: _read_split(root, require_file(root / f'Ebay_{split}.txt', f'Stanford Online Products {split} list'))
            for split in ('train', 'test')}
