"""Reader for an ImageFolder layout (one sub-folder per class), with an optional class split for zero-shot use.

Classes are the immediate sub-folders of ``root``, sorted case-insensitively (``apple, Banana, cherry``, where a
plain sort puts every upper-case name first), so "the first N classes" does not depend on how names are cased.
Images are the files with a torchvision image extension anywhere below a class folder. Hidden entries (names
starting with ``'.'``, e.g. macOS ``._x.jpg`` resource forks) are ignored.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

from torchvision.datasets.folder import IMG_EXTENSIONS

from ..utils.checks import PathLike
from .annotation_files import require_dir
from .image_list import ImageList, resolve_class_count

__all__ = ['read_image_folder', 'list_images', 'list_class_folders', 'is_image_file']

_logger = logging.getLogger(__name__)


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with one of torchvision's image extensions (any case)."""
    return not name.startswith('.') and name.lower().endswith(IMG_EXTENSIONS)


def list_class_folders(root: Path) -> List[str]:
    """Names of the non-hidden sub-folders of ``root``, sorted case-insensitively (ties: case-sensitively)."""
    names = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.')]
    return sorted(names, key=lambda n: (n.casefold(), n))


def _images_below(folder: Path, follow_links: bool = False, seen: Optional[set] = None) -> List[str]:
    """Images below ``folder``; with links followed, folders whose real path is in ``seen`` are not entered (and
    the ones walked are added to it)."""
    found = []
    seen = set() if seen is None else seen
    seen.add(os.path.realpath(folder))
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow_links):
        # prune hidden folders in place so os.walk does not descend into them; when links are followed, also every
        # folder already walked (a link back up would loop, a second link to a folder would list it twice)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))  # sorted: which link wins is fixed
        if follow_links:
            kept = []
            for d in dirnames:
                real = os.path.realpath(os.path.join(dirpath, d))
                if real not in seen:
                    seen.add(real)
                    kept.append(d)
            dirnames[:] = kept
        found += [os.path.join(dirpath, f) for f in filenames if is_image_file(f)]
    return sorted(found)


def list_images(root: PathLike) -> List[str]:
    """Every image below ``root``, at any depth, as sorted absolute paths: an unlabelled gallery (a catalogue to
    index) rather than a data set, so sub-folders are only a storage layout here, not classes.

    Args:
        root: The folder.

    Returns:
        The image paths (torchvision's image extensions, any case; hidden files and folders skipped; linked
        folders followed, each folder listed once).

    Raises:
        FileNotFoundError: If ``root`` is missing or holds no image.
    """
    root = require_dir(root, 'image folder')
    images = _images_below(root, follow_links=True)
    if not images:
        raise FileNotFoundError(f'{root} holds no images (extensions: {", ".join(IMG_EXTENSIONS)})')
    return images


def read_image_folder(
        root: PathLike,
        train_classes: Optional[Union[int, float]] = None,
        exclude: Iterable[str] = (),
) -> Dict[str, ImageList]:
    """Read a folder-per-class data set.

    Args:
        root: Folder whose sub-folders are the classes.
        train_classes: ``None``: one split ``'all'``. An int N: the first N classes (case-insensitive order) are
            ``'train'``, the others ``'test'``. A float in ``(0, 1)``: that fraction of the classes, rounded
            (half to even), goes to ``'train'``.
        exclude: Class folder names to leave out (each must exist).

    Returns:
        ``{'all': ...}`` or ``{'train': ..., 'test': ...}``; each split labels its classes ``0..C-1`` in the
        sorted order, class names are the folder names.

    Raises:
        FileNotFoundError: If ``root`` is missing or a class folder has no image.
        ValueError: If ``root`` has no class folder, ``exclude`` names an unknown class, or ``train_classes``
            leaves a split empty.
        TypeError: If ``train_classes`` is not None, an int or a float.
    """
    root = require_dir(root, 'image folder root')
    classes = list_class_folders(root)
    if isinstance(exclude, (str, bytes, os.PathLike)):  # set('12') would exclude classes '1' and '2'
        raise TypeError(f'exclude must be a list of class folder names, got {type(exclude).__name__} {exclude!r}; '
                        f'for one class pass [{exclude!r}]')
    exclude = set(exclude)
    unknown = sorted(exclude - set(classes))
    if unknown:
        raise ValueError(f'exclude names classes that are not folders of {root}: {unknown}')
    classes = [c for c in classes if c not in exclude]
    if not classes:
        raise ValueError(f'{root} has no class sub-folders: an image folder data set needs one folder per class '
                         f'(root/<class>/<image>)')
    loose = [f for f in os.listdir(root) if is_image_file(f) and (root / f).is_file()]
    if loose:
        _logger.warning('%s holds %d images outside any class folder; they are not used (e.g. %s)',
                        root, len(loose), loose[0])
    paths: List[str] = []
    image_classes: List[str] = []
    # linked sub-folders are read (as torchvision's ImageFolder does), but never the root or a class folder again
    # through a link (its images would get a second label), nor one folder twice
    seen = {os.path.realpath(root)} | {os.path.realpath(root / c) for c in list_class_folders(root)}
    for name in classes:
        images = _images_below(root / name, follow_links=True, seen=seen)
        if not images:
            raise FileNotFoundError(f'class folder {root / name} has no images (extensions: '
                                    f'{", ".join(IMG_EXTENSIONS)}); remove it or pass exclude=[{name!r}]')
        paths += images
        image_classes += [name] * len(images)
    if train_classes is None:
        return {'all': ImageList.from_class_names(paths, image_classes, classes)}
    num_train = resolve_class_count(train_classes, len(classes), 'train_classes')
    splits = {}
    for split, names in (('train', classes[:num_train]), ('test', classes[num_train:])):
        keep = set(names)
        idx = [i for i, c in enumerate(image_classes) if c in keep]
        splits[split] = ImageList.from_class_names([paths[i] for i in idx], [image_classes[i] for i in idx], names)
    return splits
