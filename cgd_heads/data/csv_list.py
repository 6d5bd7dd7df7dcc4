"""Reader for a CSV image list: a header with ``path`` and ``label`` columns, optionally ``split``.

Paths may be absolute or relative to the CSV file's folder (so a data set folder with its CSV can be moved).
Labels are class names (any string). Without a ``split`` column every row is in split ``'all'``. Each split is
labelled on its own (``0..C-1`` over its classes, sorted), except ``'query'`` and ``'gallery'``, which share one
mapping over the union of their classes because retrieval compares their labels directly.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Tuple

from ..utils.checks import PathLike
from .annotation_files import require_file
from .image_list import ImageList

__all__ = ['read_csv', 'CSV_REQUIRED_COLUMNS', 'SHARED_LABEL_SPLITS']

CSV_REQUIRED_COLUMNS = ('path', 'label')
#: Splits whose labels must agree with each other (queries are matched against the gallery).
SHARED_LABEL_SPLITS = ('query', 'gallery')


def read_csv(path: PathLike) -> Dict[str, ImageList]:
    """Read an image list from a CSV file.

    Args:
        path: CSV file (UTF-8, comma separated, first row the header ``path,label[,split]``; other columns
            are ignored).

    Returns:
        Split name -> ImageList, in order of first appearance (``{'all': ...}`` without a split column).

    Raises:
        FileNotFoundError: If the CSV is missing.
        ValueError: If a required column is missing, a cell is empty, or the file has no rows.
    """
    path = require_file(path, 'image list CSV')
    base = path.parent
    rows: Dict[str, List[Tuple[str, str]]] = {}
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in CSV_REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(f'{path}: the header must name the columns path,label[,split]; missing {missing}, '
                             f'got {columns}')
        reader.fieldnames = columns
        has_split = 'split' in columns
        for row in reader:
            # line_num counts physical lines (header included), so the message matches what an editor shows
            lineno = reader.line_num
            values = {c: (row.get(c) or '').strip() for c in (*CSV_REQUIRED_COLUMNS, 'split')}
            empty = [c for c in CSV_REQUIRED_COLUMNS + (('split',) if has_split else ()) if not values[c]]
            if empty:
                raise ValueError(f'{path}, line {lineno}: empty {empty} (every row needs a path and a label'
                                 f'{" and a split" if has_split else ""})')
            image = Path(values['path']).expanduser()
            image = image if image.is_absolute() else base / image
            rows.setdefault(values['split'] if has_split else 'all', []).append((str(image), values['label']))
    if not rows:
        raise ValueError(f'{path}: no data rows after the header')
    shared = sorted({label for s in SHARED_LABEL_SPLITS for _, label in rows.get(s, [])})
    splits = {}
    for split, entries in rows.items():
        names = shared if split in SHARED_LABEL_SPLITS else None
        splits[split] = ImageList.from_class_names([p for p, _ in entries], [lab for _, lab in entries], names)
    return splits
