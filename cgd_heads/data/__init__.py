"""Data layer: image lists of the retrieval benchmarks, a torch Dataset over them, and the CGD transforms.

Example:
    >>> import timm
    >>> from cgd_heads.data import ImageDataset, create_cgd_transform, load_splits
    >>> splits = load_splits('cars196', 'data/cars196')  # doctest: +SKIP
    >>> config = timm.data.resolve_model_data_config(timm.create_model('resnet50'))  # doctest: +SKIP
    >>> train = ImageDataset(splits['train'], create_cgd_transform(config, is_training=True))  # doctest: +SKIP
"""
from .caltech101 import read_caltech101
from .cars196 import read_cars196
from .csv_list import read_csv
from .cub200 import read_cub200
from .dataset import ImageDataset
from .image_folder import list_images, read_image_folder
from .image_io import BadImageError, load_rgb_image
from .image_list import Box, ImageList
from .inshop import read_inshop
from .omniglot import read_omniglot
from .registry import DATASET_READERS, detect_dataset, load_splits
from .sop import read_sop
from .transforms import create_cgd_transform, data_config_of
from .zip_cache import cache_root

__all__ = [
    'BadImageError',
    'Box',
    'DATASET_READERS',
    'ImageDataset',
    'ImageList',
    'cache_root',
    'create_cgd_transform',
    'data_config_of',
    'detect_dataset',
    'list_images',
    'load_rgb_image',
    'load_splits',
    'read_caltech101',
    'read_cars196',
    'read_csv',
    'read_cub200',
    'read_image_folder',
    'read_inshop',
    'read_omniglot',
    'read_sop',
]
