"""ImageDataset: a torch Dataset over an ImageList, returning ``(image, label)`` pairs."""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Tuple

from torch.utils.data import Dataset

from ..utils.checks import check_bool
from .image_io import load_rgb_image, verify_image
from .image_list import ImageList

__all__ = ['ImageDataset']

_logger = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images of an :class:`ImageList` as RGB PIL images (or whatever ``transform`` makes of them) with labels.

    Grayscale images are replicated to three channels; when the list has boxes each image is cropped to its
    box before the transform.

    Args:
        image_list: The images.
        transform: Optional callable applied to the RGB PIL image (e.g. :func:`create_cgd_transform`).
        skip_bad_images: If True, every image is decoded once here and the unreadable ones (missing, not an
            image, truncated) are left out and logged as a warning; their paths are in :attr:`skipped`. If False
            (default) nothing is read up front and a bad image raises when it is loaded.

    Attributes:
        image_list: The images served (bad ones already removed when ``skip_bad_images``).
        skipped: Paths left out by ``skip_bad_images`` (empty otherwise).

    Raises:
        TypeError: If ``image_list`` is not an ImageList or ``transform`` is not callable.
        ValueError: If ``skip_bad_images`` leaves no image at all.

    Example:
        >>> from pytorch_metric_learning.samplers import MPerClassSampler  # doctest: +SKIP
        >>> sampler = MPerClassSampler(dataset.labels, m=4, length_before_new_iter=len(dataset))  # doctest: +SKIP
    """

    def __init__(
            self,
            image_list: ImageList,
            transform: Optional[Callable[[Any], Any]] = None,
            skip_bad_images: bool = False,
    ) -> None:
        if not isinstance(image_list, ImageList):
            raise TypeError(f'image_list must be an ImageList (see cgd_heads.data.load_splits), '
                            f'got {type(image_list).__name__}')
        if transform is not None and not callable(transform):
            raise TypeError(f'transform must be callable or None, got {type(transform).__name__}')
        self.transform = transform
        self.skipped: List[str] = []
        if check_bool(skip_bad_images, 'skip_bad_images'):
            image_list = self._without_bad_images(image_list)
        self.image_list = image_list

    def _without_bad_images(self, image_list: ImageList) -> ImageList:
        errors = [(i, verify_image(path)) for i, path in enumerate(image_list.paths)]
        bad = {i for i, err in errors if err is not None}
        if not bad:
            return image_list
        self.skipped = [image_list.paths[i] for i in sorted(bad)]
        _logger.warning('skip_bad_images: skipped %d of %d unreadable images: %s', len(bad), len(image_list),
                        '; '.join(err for _, err in errors if err is not None))
        if len(bad) == len(image_list):
            raise ValueError(f'skip_bad_images: none of the {len(image_list)} images can be read '
                             f'(first: {self.skipped[0]})')
        keep = [i for i in range(len(image_list)) if i not in bad]
        return ImageList(
            paths=[image_list.paths[i] for i in keep],
            labels=[image_list.labels[i] for i in keep],
            class_names=image_list.class_names,
            boxes=None if image_list.boxes is None else [image_list.boxes[i] for i in keep],
        )

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f'index {index} out of range for ImageDataset of {len(self)} images')
        boxes = self.image_list.boxes
        img = load_rgb_image(self.image_list.paths[index], None if boxes is None else boxes[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.image_list.labels[index]

    @property
    def labels(self) -> List[int]:
        """Label of every image, in dataset order (what ``MPerClassSampler`` takes)."""
        return self.image_list.labels

    @property
    def paths(self) -> List[str]:
        """Path of every image, in dataset order."""
        return self.image_list.paths

    @property
    def class_names(self) -> List[str]:
        """Class names, indexed by label."""
        return self.image_list.class_names

    @property
    def num_classes(self) -> int:
        """Number of classes of the underlying list (classes whose images were all skipped still count)."""
        return self.image_list.num_classes
