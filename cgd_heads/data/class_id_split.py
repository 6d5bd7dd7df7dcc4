"""The zero-shot split of CUB200 / CARS196: the first classes (by official 1-based id) train, the rest test.

Metric-learning papers (Oh Song et al. 2016, and CGD after them) train on the first half of the classes and
evaluate retrieval on the other, unseen half, ignoring the datasets' per-image train/test files.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

from .image_list import Box, ImageList

__all__ = ['split_by_class_id']


def split_by_class_id(
        items: Sequence[Tuple[int, str, Optional[Box]]],
        class_names: Mapping[int, str],
        num_train_classes: int,
        dataset: str,
        with_boxes: bool,
) -> Dict[str, ImageList]:
    """Split ``(class_id, absolute_path, box)`` items into ``'train'`` (ids ``<= num_train_classes``) and ``'test'``.

    Labels follow the class ids; classes without images are left out of ``class_names`` so labels stay
    contiguous.

    Args:
        items: One entry per image.
        class_names: Name of every class id.
        num_train_classes: Last class id of the training split.
        dataset: Dataset name for error messages.
        with_boxes: Attach the boxes (all must be set) or drop them.

    Returns:
        ``{'train': ImageList, 'test': ImageList}``.

    Raises:
        ValueError: If a split has no image.
    """
    ranges = {'train': (1, num_train_classes), 'test': (num_train_classes + 1, max(class_names))}
    splits = {}
    for split, (first, last) in ranges.items():
        chosen = [it for it in items if first <= it[0] <= last]
        if not chosen:
            raise ValueError(f'{dataset}: split {split!r} (class ids {first}-{last}) has no images; '
                             f'{len(items)} images were found in total')
        present = sorted({class_id for class_id, _, _ in chosen})
        splits[split] = ImageList.from_class_names(
            paths=[path for _, path, _ in chosen],
            image_classes=[class_names[class_id] for class_id, _, _ in chosen],
            class_names=[class_names[class_id] for class_id in present],
            boxes=[box for _, _, box in chosen] if with_boxes else None,
        )
    return splits
