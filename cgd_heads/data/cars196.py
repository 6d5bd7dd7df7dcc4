"""Reader for Stanford Cars / CARS196 (Krause et al. 2013), in both published annotation formats.

Layouts accepted (``root`` is the folder holding them), tried in this order:

1. Combined file (what most metric-learning code uses): ``cars_annos.mat`` with the struct array
   ``annotations`` (fields ``relative_im_path``, ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``, ``class``,
   ``test``) and ``class_names``; images at ``root/<relative_im_path>`` (``car_ims/000001.jpg``).
2. Official devkit: ``devkit/cars_train_annos.mat`` (struct array ``annotations`` with ``bbox_x1``,
   ``bbox_y1``, ``bbox_x2``, ``bbox_y2``, ``class``, ``fname``; images in ``cars_train/``), optionally
   ``cars_test_annos_withlabels.mat`` (same fields, in ``devkit/`` or ``root``; images in ``cars_test/``), and
   ``devkit/cars_meta.mat`` (``class_names``). Without the labelled test file only the training half is read
   (the devkit's ``cars_test_annos.mat`` has no classes).
3. Devkit with class folders: ``devkit/cars_train_annos.mat`` and ``devkit/cars_meta.mat`` with the training
   images in ``images/NNN.<name>/<fname>`` (NNN = the 3-digit class id) instead of ``cars_train/``: the layout
   of redistributed copies that were cropped and resized. Every annotated image must sit in its class's folder.
   The devkit's boxes refer to the original images, so ``crop=True`` is refused here; only the training
   annotations are read (the halves' file names overlap, so test images could not share the folders).

Either way the zero-shot protocol applies over every annotated image: classes 1-98 train, 99-196 test.
Devkit boxes are MATLAB pixel indices (1-based, inclusive), converted to PIL's 0-based, right/bottom-exclusive
boxes as ``(x1 - 1, y1 - 1, x2, y2)``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..utils.checks import PathLike, check_bool
from .annotation_files import require_dir, require_file
from .class_id_split import split_by_class_id
from .image_folder import list_class_folders
from .image_list import Box, ImageList
from .mat_file import load_mat, string_list, struct_rows

__all__ = ['read_cars196', 'CARS196_NUM_TRAIN_CLASSES', 'is_cars196_dir']

_logger = logging.getLogger(__name__)

#: Classes 1..98 train, 99..196 test.
CARS196_NUM_TRAIN_CLASSES = 98
_BOX_FIELDS = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2')
_TEST_ANNOS = 'cars_test_annos_withlabels.mat'

Item = Tuple[int, str, Optional[Box]]


def is_cars196_dir(root: PathLike) -> bool:
    """True if ``root`` holds ``cars_annos.mat`` or ``devkit/cars_train_annos.mat``."""
    root = Path(root)
    return (root / 'cars_annos.mat').is_file() or (root / 'devkit' / 'cars_train_annos.mat').is_file()


def _int(value: Any, path: Path, index: int, field: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{path}: annotation {index} field {field!r} must be a number, got {value!r}') from e
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f'{path}: annotation {index} field {field!r} must be an integer, got {value!r}')
    return int(number)


def _box(row: Dict[str, Any], path: Path, index: int) -> Box:
    x1, y1, x2, y2 = (_int(row[f], path, index, f) for f in _BOX_FIELDS)
    if x1 < 1 or y1 < 1 or x2 < x1 or y2 < y1:
        raise ValueError(f'{path}: annotation {index} has an invalid box (x1={x1}, y1={y1}, x2={x2}, y2={y2}); '
                         f'expected 1-based inclusive pixel bounds with x1 <= x2 and y1 <= y2')
    return (x1 - 1, y1 - 1, x2, y2)


def _items(path: Path, rows: List[Dict[str, Any]], image_dir: Path, path_field: str,
           num_classes: int, crop: bool) -> List[Item]:
    items = []
    for i, row in enumerate(rows):
        class_id = _int(row['class'], path, i, 'class')
        if not 1 <= class_id <= num_classes:
            raise ValueError(f'{path}: annotation {i} has class {class_id}, expected 1..{num_classes} '
                             f'(one per class name)')
        rel = row[path_field]
        if not isinstance(rel, str) or not rel:
            raise ValueError(f'{path}: annotation {i} field {path_field!r} must be a file name, got {rel!r}')
        items.append((class_id, str(image_dir / rel), _box(row, path, i) if crop else None))
    return items


def _read_combined(root: Path, crop: bool) -> Tuple[List[Item], List[str]]:
    path = root / 'cars_annos.mat'
    mat = load_mat(path)
    class_names = string_list(mat, 'class_names', path)
    rows = struct_rows(mat, 'annotations', (*_BOX_FIELDS, 'class', 'relative_im_path'), path)
    return _items(path, rows, root, 'relative_im_path', len(class_names), crop), class_names


def _class_folder_items(root: Path, items: List[Item], crop: bool) -> List[Item]:
    """Re-point devkit items (``cars_train/<fname>``) at ``images/NNN.<name>/<fname>``, checking each is there."""
    images = root / 'images'
    if crop:
        raise ValueError(f'crop=True: the boxes in devkit/cars_train_annos.mat refer to the original images '
                         f'(cars_train/), which {root} does not hold; the images in {images} are copies made '
                         f'after annotation (usually already cropped): read them with crop=False')
    folders: Dict[int, str] = {}
    for name in list_class_folders(images):
        prefix = name.split('.', 1)[0]
        if prefix.isdigit():
            folders[int(prefix)] = name
    located = []
    for i, (class_id, path, box) in enumerate(items):
        folder = folders.get(class_id)
        candidate = images / folder / Path(path).name if folder else None
        if candidate is None or not candidate.is_file():
            where = 'no such folder' if candidate is None else f'{candidate} missing'
            raise FileNotFoundError(f'CARS196: annotation {i} ({Path(path).name}, class {class_id}) is not in its '
                                    f'class folder {images}/{class_id:03d}.*/ ({where})')
        located.append((class_id, str(candidate), box))
    return located


def _read_devkit(root: Path, crop: bool) -> Tuple[List[Item], List[str]]:
    devkit = root / 'devkit'
    meta = require_file(devkit / 'cars_meta.mat', 'CARS196 class names')
    class_names = string_list(load_mat(meta), 'class_names', meta)
    fields = (*_BOX_FIELDS, 'class', 'fname')
    train = devkit / 'cars_train_annos.mat'
    rows = struct_rows(load_mat(train), 'annotations', fields, train)
    if not (root / 'cars_train').is_dir() and (root / 'images').is_dir():
        _logger.info('CARS196: no cars_train/ in %s, reading the training half from the class folders in images/',
                     root)
        return _class_folder_items(root, _items(train, rows, root / 'cars_train', 'fname', len(class_names), False),
                                   crop), class_names
    items = _items(train, rows, require_dir(root / 'cars_train', 'CARS196 training images (or images/NNN.<name>/ '
                                                                 'class folders)'), 'fname', len(class_names), crop)
    test = next((p for p in (devkit / _TEST_ANNOS, root / _TEST_ANNOS) if p.is_file()), None)
    if test is None:
        _logger.info('CARS196: no %s in %s or %s, reading the official training half only (%d images)',
                     _TEST_ANNOS, devkit, root, len(items))
    else:
        items += _items(test, struct_rows(load_mat(test), 'annotations', fields, test),
                        require_dir(root / 'cars_test', f'CARS196 test images (annotated in {test})'), 'fname',
                        len(class_names), crop)
    return items, class_names


def read_cars196(root: PathLike, crop: bool = False) -> Dict[str, ImageList]:
    """Read CARS196 (combined ``cars_annos.mat`` or the official devkit files) with the zero-shot split.

    Args:
        root: Folder holding ``cars_annos.mat``, or ``devkit/`` and ``cars_train/`` or ``images/`` class folders
            (see the module docstring).
        crop: Attach the annotated boxes so :class:`ImageDataset` crops to the car. Leave False when the images
            were resized after annotation (the boxes would point at the wrong pixels).

    Returns:
        ``{'train': classes 1-98, 'test': classes 99-196}``, labels in class-id order, names from
        ``class_names`` (e.g. ``'AM General Hummer SUV 2000'``).

    Raises:
        FileNotFoundError: If ``root`` or a needed file/folder is missing.
        ValueError: If an annotation file is malformed.
    """
    crop = check_bool(crop, 'crop')
    root = require_dir(root, 'CARS196 root')
    if (root / 'cars_annos.mat').is_file():
        items, class_names = _read_combined(root, crop)
    elif (root / 'devkit' / 'cars_train_annos.mat').is_file():
        items, class_names = _read_devkit(root, crop)
    else:
        raise FileNotFoundError(f'CARS196: {root} holds neither cars_annos.mat nor devkit/cars_train_annos.mat '
                                f'(the two published annotation formats)')
    names = {i + 1: name for i, name in enumerate(class_names)}
    return split_by_class_id(items, names, CARS196_NUM_TRAIN_CLASSES, 'CARS196', with_boxes=crop)
