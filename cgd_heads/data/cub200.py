"""Reader for CUB-200-2011 (Wah et al. 2011) in its official layout, with the zero-shot class split.

Files (all in the ``CUB_200_2011`` folder): ``images.txt`` (``<image_id> <path>``, path relative to ``images/``),
``image_class_labels.txt`` (``<image_id> <class_id>``), ``classes.txt`` (``<class_id> <name>``) and, for cropping,
``bounding_boxes.txt`` (``<image_id> <x> <y> <width> <height>``, floats, pixels). The metric-learning protocol
trains on classes 1-100 and evaluates on the unseen classes 101-200; the official train_test_split.txt is a
per-image split for classification and is not used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

from ..utils.checks import PathLike, check_bool
from .annotation_files import parse_field, read_rows, require_dir, require_file
from .class_id_split import split_by_class_id
from .image_list import Box, ImageList

__all__ = ['read_cub200', 'find_cub200_dir', 'CUB200_NUM_TRAIN_CLASSES']

T = TypeVar('T')

#: Classes 1..100 train, 101..200 test.
CUB200_NUM_TRAIN_CLASSES = 100


def find_cub200_dir(root: PathLike) -> Path:
    """Return the folder holding ``images.txt``: ``root`` itself or ``root/CUB_200_2011``.

    Raises:
        FileNotFoundError: If neither holds ``images.txt``.
    """
    root = require_dir(root, 'CUB-200-2011 root')
    for candidate in (root, root / 'CUB_200_2011'):
        if (candidate / 'images.txt').is_file():
            return candidate
    raise FileNotFoundError(f'CUB-200-2011: no images.txt in {root} or {root / "CUB_200_2011"}; root must be the '
                            f'CUB_200_2011 folder of the official archive or its parent')


def _id_table(path: Path, convert: Callable[[str], T], value_name: str) -> Dict[int, T]:
    """Read ``<id> <value>`` lines into ``{id: convert(value)}``."""
    table: Dict[int, T] = {}
    for lineno, (key, value) in read_rows(path, 2):
        key_id = parse_field(key, int, path, lineno, 'id')
        if key_id in table:
            raise ValueError(f'{path}, line {lineno}: duplicate id {key_id}')
        table[key_id] = parse_field(value, convert, path, lineno, value_name)
    return table


def _boxes(path: Path) -> Dict[int, Box]:
    boxes: Dict[int, Box] = {}
    for lineno, fields in read_rows(path, 5):
        image_id = parse_field(fields[0], int, path, lineno, 'image id')
        x, y, w, h = (parse_field(v, float, path, lineno, 'box coordinate') for v in fields[1:])
        if w <= 0 or h <= 0:
            raise ValueError(f'{path}, line {lineno}: box width and height must be > 0, got {w} x {h}')
        # x, y are the top-left corner; PIL boxes are (left, top, right, bottom) with right/bottom exclusive
        boxes[image_id] = (round(x), round(y), round(x + w), round(y + h))
    return boxes


def read_cub200(root: PathLike, crop: bool = False) -> Dict[str, ImageList]:
    """Read CUB-200-2011 with the zero-shot split.

    Args:
        root: The ``CUB_200_2011`` folder or its parent.
        crop: Attach the ``bounding_boxes.txt`` boxes so :class:`ImageDataset` crops to the bird.

    Returns:
        ``{'train': classes 1-100, 'test': classes 101-200}``; labels follow the class ids, class names are
        those of ``classes.txt`` (e.g. ``'001.Black_footed_Albatross'``). A class with no images is left out of
        its split's ``class_names`` so labels stay contiguous.

    Raises:
        FileNotFoundError: If the folder or an annotation file is missing (``bounding_boxes.txt`` only when
            ``crop``).
        ValueError: If the files disagree (an image without a class, an unknown class id, a malformed line).
    """
    crop = check_bool(crop, 'crop')
    base = find_cub200_dir(root)
    image_dir = require_dir(base / 'images', 'CUB-200-2011 images')
    images = _id_table(require_file(base / 'images.txt', 'CUB-200-2011 image list'), str, 'path')
    labels_file = require_file(base / 'image_class_labels.txt', 'CUB-200-2011 image labels')
    image_class = _id_table(labels_file, int, 'class id')
    classes_file = require_file(base / 'classes.txt', 'CUB-200-2011 class names')
    class_names = _id_table(classes_file, str, 'class name')
    boxes = _boxes(require_file(base / 'bounding_boxes.txt', 'CUB-200-2011 boxes (needed for crop=True)')) \
        if crop else None

    items: List[Tuple[int, str, Optional[Box]]] = []
    for image_id, rel_path in images.items():
        if image_id not in image_class:
            raise ValueError(f'{labels_file}: no class for image id {image_id} ({rel_path}) of images.txt')
        class_id = image_class[image_id]
        if class_id not in class_names:
            raise ValueError(f'{labels_file}: image id {image_id} has class {class_id}, which is not in '
                             f'{classes_file}')
        if boxes is not None and image_id not in boxes:
            raise ValueError(f'{base / "bounding_boxes.txt"}: no box for image id {image_id} ({rel_path})')
        items.append((class_id, str(image_dir / rel_path), boxes[image_id] if boxes is not None else None))

    return split_by_class_id(items, class_names, CUB200_NUM_TRAIN_CLASSES, 'CUB-200-2011', with_boxes=crop)
