"""Reader for Caltech-101 (Fei-Fei et al. 2004) with this project's zero-shot class split.

Caltech-101 is an ImageFolder layout, ``101_ObjectCategories/<class>/image_NNNN.jpg``. The project's protocol
sorts the 101 object classes case-insensitively and trains on the first 50; the clutter folder
``BACKGROUND_Google`` of the original archive is not an object class and is left out. ``Faces`` and
``Faces_easy`` (the same people, two crops) sort next to each other and both fall among the first 50, so no
person is both a training and an evaluation identity.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Union

from ..utils.checks import PathLike
from .annotation_files import require_dir
from .image_folder import read_image_folder
from .image_list import ImageList

__all__ = ['read_caltech101', 'find_caltech101_dir', 'CALTECH101_TRAIN_CLASSES', 'CALTECH101_BACKGROUND']

_logger = logging.getLogger(__name__)

#: Classes (case-insensitive order) used for training; the other 51 are evaluation classes.
CALTECH101_TRAIN_CLASSES = 50
#: Clutter folder of the original archive, not an object class.
CALTECH101_BACKGROUND = 'BACKGROUND_Google'
_FOLDER = '101_ObjectCategories'


def find_caltech101_dir(root: PathLike) -> Path:
    """Return ``root/101_ObjectCategories`` if it exists, else ``root`` itself (already the category folder).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
    """
    root = require_dir(root, 'Caltech-101 root')
    return root / _FOLDER if (root / _FOLDER).is_dir() else root


def read_caltech101(root: PathLike, train_classes: Union[int, float, None] = CALTECH101_TRAIN_CLASSES,
                    ) -> Dict[str, ImageList]:
    """Read Caltech-101 and split its classes.

    Args:
        root: The ``101_ObjectCategories`` folder or its parent.
        train_classes: Passed to :func:`read_image_folder`: first N classes (int), a fraction (float), or None
            for one ``'all'`` split. Default 50 (the project protocol: 50 train / 51 test classes).

    Returns:
        ``{'train': ..., 'test': ...}`` (or ``{'all': ...}``).

    Raises:
        FileNotFoundError: If ``root`` is missing or a class folder is empty.
        ValueError: If there are no class folders or ``train_classes`` is out of range.
    """
    folder = find_caltech101_dir(root)
    exclude = [CALTECH101_BACKGROUND] if (folder / CALTECH101_BACKGROUND).is_dir() else []
    if exclude:
        _logger.info('Caltech-101: leaving out the clutter folder %s', folder / CALTECH101_BACKGROUND)
    return read_image_folder(folder, train_classes=train_classes, exclude=exclude)
