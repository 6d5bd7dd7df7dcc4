"""``load_splits``: one entry point for every reader, by name or by detecting the layout on disk.

Detection (``name='auto'``) checks, in this order, and picks the first match:

1. ``csv``: ``root`` is a file ending in ``.csv``.
2. ``cub200``: ``images.txt`` and ``image_class_labels.txt`` in ``root`` or ``root/CUB_200_2011``.
3. ``cars196``: ``cars_annos.mat`` or ``devkit/cars_train_annos.mat`` in ``root`` (images in ``cars_train/`` or
   in ``images/NNN.<name>/`` class folders).
4. ``sop``: ``Ebay_train.txt`` in ``root``.
5. ``inshop``: ``list_eval_partition.txt`` in ``root`` or ``root/Eval``.
6. ``omniglot``: ``images_background_small1`` (zip or folder) in ``root``.
7. ``caltech101``: ``root`` is, or holds, a folder named ``101_ObjectCategories``.
8. ``folder``: any other folder with sub-folders (one per class).

The annotation-file formats come first because their folders also have sub-folders that would pass for
classes of an ImageFolder layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict

from ..utils.checks import PathLike
from .caltech101 import read_caltech101
from .cars196 import is_cars196_dir, read_cars196
from .csv_list import read_csv
from .cub200 import read_cub200
from .image_folder import list_class_folders, read_image_folder
from .image_list import ImageList
from .inshop import read_inshop
from .omniglot import OMNIGLOT_SPLITS, read_omniglot
from .sop import read_sop

__all__ = ['load_splits', 'detect_dataset', 'DATASET_READERS']

#: Name -> reader; each takes the root (a CSV file for ``'csv'``) plus its own keyword arguments.
DATASET_READERS: Dict[str, Callable[..., Dict[str, ImageList]]] = {
    'cub200': read_cub200,
    'cars196': read_cars196,
    'sop': read_sop,
    'inshop': read_inshop,
    'folder': read_image_folder,
    'csv': read_csv,
    'omniglot': read_omniglot,
    'caltech101': read_caltech101,
}


def detect_dataset(root: PathLike) -> str:
    """Name of the reader for the layout at ``root`` (see the module docstring for the order).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        ValueError: If no layout matches.
    """
    root = Path(root).expanduser().absolute()
    if not root.exists():
        raise FileNotFoundError(f'data root {root} does not exist')
    if root.is_file():
        if root.suffix.lower() == '.csv':
            return 'csv'
        raise ValueError(f'cannot detect a data set from the file {root}: only a .csv image list can be a file')
    for base in (root, root / 'CUB_200_2011'):
        if (base / 'images.txt').is_file() and (base / 'image_class_labels.txt').is_file():
            return 'cub200'
    if is_cars196_dir(root):
        return 'cars196'
    if (root / 'Ebay_train.txt').is_file():
        return 'sop'
    if (root / 'list_eval_partition.txt').is_file() or (root / 'Eval' / 'list_eval_partition.txt').is_file():
        return 'inshop'
    stem = OMNIGLOT_SPLITS['train']
    if (root / f'{stem}.zip').is_file() or (root / stem).is_dir():
        return 'omniglot'
    if root.name == '101_ObjectCategories' or (root / '101_ObjectCategories').is_dir():
        return 'caltech101'
    if list_class_folders(root):
        return 'folder'
    raise ValueError(f'cannot detect a data set layout in {root}: expected the files of one of '
                     f'{sorted(DATASET_READERS)} (see cgd_heads.data.registry) or class sub-folders')


def load_splits(name: str, root: PathLike, **kwargs: Any) -> Dict[str, ImageList]:
    """Read a data set's splits.

    Args:
        name: One of ``'cub200'``, ``'cars196'``, ``'sop'``, ``'inshop'``, ``'folder'``, ``'csv'``,
            ``'omniglot'``, ``'caltech101'``, or ``'auto'`` to detect it from the files at ``root``.
        root: Data set folder (the CSV file for ``'csv'``).
        **kwargs: Passed to the reader (e.g. ``crop=True`` for cub200/cars196, ``train_classes=50`` for folder).

    Returns:
        Split name -> ImageList (``'train'``/``'test'``, In-shop ``'train'``/``'query'``/``'gallery'``, an
        unsplit folder or CSV ``'all'``).

    Raises:
        ValueError: If ``name`` is unknown or the layout cannot be detected.
        TypeError: If a keyword argument is not accepted by the reader.
        FileNotFoundError: If ``root`` or a needed file is missing.
    """
    if not isinstance(name, str):
        raise TypeError(f'name must be a str, got {type(name).__name__}')
    key = name.lower()
    if key == 'auto':
        key = detect_dataset(root)
    if key not in DATASET_READERS:
        raise ValueError(f'unknown data set {name!r}; valid names: {", ".join(["auto", *DATASET_READERS])}')
    reader = DATASET_READERS[key]
    try:
        return reader(root, **kwargs)
    except TypeError as e:
        # a wrong keyword would otherwise surface as an opaque "unexpected keyword argument"
        if 'keyword argument' in str(e):
            raise TypeError(f'load_splits({key!r}): {e}; see help({reader.__module__}.{reader.__name__})') from e
        raise
