"""Reader for the Omniglot "minimal" splits (Lake et al. 2015): images_background_small1 / small2.

Each split is a zip (or its extracted folder) laid out as ``<split>/<Alphabet>/character<NN>/<id>_<drawer>.png``.
A class is one character of one alphabet, named ``'<Alphabet>/character<NN>'`` (character numbers restart in
every alphabet). Zips are extracted once into the user cache (see :mod:`cgd_heads.data.zip_cache`), never
beside the zips. The project protocol trains on small1 (136 classes) and evaluates on the unseen small2
(156 classes).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..utils.checks import PathLike
from .annotation_files import require_dir
from .image_folder import is_image_file, list_class_folders
from .image_list import ImageList
from .zip_cache import extract_zip_cached

__all__ = ['read_omniglot', 'find_omniglot_split', 'OMNIGLOT_SPLITS']

#: Split name -> archive stem (the zip's name without ``.zip``, also its top-level folder).
OMNIGLOT_SPLITS = {'train': 'images_background_small1', 'test': 'images_background_small2'}


def find_omniglot_split(root: PathLike, stem: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Return the folder of alphabets for ``stem``: ``root/<stem>/`` if extracted, else the cached ``<stem>.zip``.

    Raises:
        FileNotFoundError: If neither ``root/<stem>/`` nor ``root/<stem>.zip`` exists.
    """
    root = require_dir(root, 'Omniglot root')
    if (root / stem).is_dir():
        return root / stem
    if not (root / f'{stem}.zip').is_file():
        raise FileNotFoundError(f'Omniglot: neither {root / (stem + ".zip")} nor an extracted folder {root / stem}')
    extracted = extract_zip_cached(root / f'{stem}.zip', 'omniglot', cache_dir)
    # the official zips hold one top-level folder named like the zip; tolerate zips made without it
    return extracted / stem if (extracted / stem).is_dir() else extracted


def _read_split(folder: Path) -> ImageList:
    paths: List[str] = []
    classes: List[str] = []
    for alphabet in list_class_folders(folder):
        for character in list_class_folders(folder / alphabet):
            char_dir = folder / alphabet / character
            images = sorted(str(p) for p in char_dir.iterdir() if p.is_file() and is_image_file(p.name))
            if not images:
                raise FileNotFoundError(f'Omniglot: character folder {char_dir} has no images')
            paths += images
            classes += [f'{alphabet}/{character}'] * len(images)
    if not paths:
        raise ValueError(f'Omniglot: {folder} has no <Alphabet>/<character>/ image folders')
    return ImageList.from_class_names(paths, classes)


def read_omniglot(root: PathLike, cache_dir: Optional[PathLike] = None) -> Dict[str, ImageList]:
    """Read the Omniglot small1 (train) and small2 (test) splits.

    Args:
        root: Folder holding ``images_background_small1.zip`` and ``images_background_small2.zip`` (or the
            extracted ``images_background_small1/`` and ``images_background_small2/`` folders).
        cache_dir: Where zips are extracted; defaults to ``$CGD_HEADS_CACHE`` or ``~/.cache/cgd_heads``.

    Returns:
        ``{'train': small1, 'test': small2}``; class names ``'<Alphabet>/character<NN>'``, sorted.

    Raises:
        FileNotFoundError: If a split is missing or a character folder is empty.
        ValueError: If a zip is corrupt or a split holds no character folders.
    """
    return {split: _read_split(find_omniglot_split(root, stem, cache_dir)) for split, stem in OMNIGLOT_SPLITS.items()}
