"""ImageList: the in-memory record every reader returns (image paths, contiguous labels, class names, boxes).

A retrieval split is a list of images with class labels. Labels are contiguous within one list (``0 .. C-1``,
the index into ``class_names``) so the training split can feed a classifier head of size ``num_classes``
directly; readers relabel each split on its own, except where two splits must be compared label to label
(In-shop's query and gallery), where both lists share one ``class_names``.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

__all__ = ['Box', 'ImageList', 'resolve_class_count']

#: Pixel crop box ``(x1, y1, x2, y2)``, 0-based, right/bottom exclusive (PIL's ``Image.crop`` convention).
Box = Tuple[int, int, int, int]


@dataclass
class ImageList:
    """Images of one split with their labels.

    Attributes:
        paths: Absolute image file paths.
        labels: One label per image, each in ``range(len(class_names))``.
        class_names: Name of each class; ``class_names[label]`` names the label.
        boxes: ``None``, or one ``(x1, y1, x2, y2)`` crop box per image; when given, ``ImageDataset`` crops
            every image to its box.

    Raises:
        ValueError: If lengths disagree, a path is relative, a label is out of range, class names repeat or a
            box is empty or negative.
        TypeError: If a label is not an int or a box is not four ints.
    """

    paths: List[str]
    labels: List[int]
    class_names: List[str]
    boxes: Optional[List[Box]] = None

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.labels = list(self.labels)
        self.class_names = [str(n) for n in self.class_names]
        if len(self.paths) != len(self.labels):
            raise ValueError(f'paths and labels must have the same length, got {len(self.paths)} paths and '
                             f'{len(self.labels)} labels')
        for path in self.paths:
            if not os.path.isabs(path):
                raise ValueError(f'paths must be absolute (readers resolve them against the data root), got {path!r}')
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({n for n in self.class_names if self.class_names.count(n) > 1})
            raise ValueError(f'class_names must be unique, got duplicates {dup[:5]}')
        num_classes = len(self.class_names)
        for i, label in enumerate(self.labels):
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f'labels must be ints, got {type(label).__name__} {label!r} at index {i}')
            if not 0 <= label < num_classes:
                raise ValueError(f'labels must be in [0, {num_classes}) (one per class name), got {label} '
                                 f'at index {i} ({self.paths[i]})')
        if self.boxes is not None:
            if len(self.boxes) != len(self.paths):
                raise ValueError(f'boxes must have one box per path, got {len(self.boxes)} boxes for '
                                 f'{len(self.paths)} paths')
            self.boxes = [_check_box(box, path) for box, path in zip(self.boxes, self.paths)]

    @classmethod
    def from_class_names(
            cls,
            paths: Sequence[str],
            image_classes: Sequence[str],
            class_names: Optional[Sequence[str]] = None,
            boxes: Optional[Sequence[Box]] = None,
    ) -> 'ImageList':
        """Build a list from per-image class names, labelling classes by their position in ``class_names``.

        Args:
            paths: Absolute image paths.
            image_classes: Class name of each image.
            class_names: Class order (label = index). Defaults to the sorted distinct ``image_classes``.
            boxes: Optional crop boxes, one per image.

        Returns:
            The ImageList.

        Raises:
            ValueError: If an image's class is missing from ``class_names``.
        """
        if class_names is None:
            class_names = sorted(set(image_classes))
        if len(image_classes) != len(paths):
            raise ValueError(f'image_classes must have one entry per path, got {len(image_classes)} for '
                             f'{len(paths)} paths')
        index = {name: i for i, name in enumerate(class_names)}
        labels = []
        for path, name in zip(paths, image_classes):
            if name not in index:
                raise ValueError(f'class {name!r} of image {path} is not in class_names '
                                 f'({len(index)} classes, e.g. {list(index)[:3]})')
            labels.append(index[name])
        return cls(list(paths), labels, list(class_names), None if boxes is None else list(boxes))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``), which is the classifier size for a training split."""
        return len(self.class_names)

    def subset_classes(self, labels: Iterable[int]) -> 'ImageList':
        """Keep the images of the given classes, relabelled ``0 .. k-1`` in ascending order of the old label.

        Args:
            labels: Labels (indices into ``class_names``) of the classes to keep.

        Returns:
            A new ImageList whose ``class_names`` are the kept classes.

        Raises:
            ValueError: If a label is out of range.
        """
        keep = sorted(set(labels))
        for label in keep:
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                raise ValueError(f'labels must be ints in [0, {self.num_classes}), got {label!r}')
        new_label = {old: new for new, old in enumerate(keep)}
        idx = [i for i, label in enumerate(self.labels) if label in new_label]
        return ImageList(
            paths=[self.paths[i] for i in idx],
            labels=[new_label[self.labels[i]] for i in idx],
            class_names=[self.class_names[old] for old in keep],
            boxes=None if self.boxes is None else [self.boxes[i] for i in idx],
        )

    def split_classes(self, held_out: Union[int, float], seed: int = 0) -> Tuple['ImageList', 'ImageList']:
        """Split by class, e.g. to carve a validation set of unseen classes out of a training split.

        The held-out classes are drawn with ``random.Random(seed)`` from the classes that have images, so the
        same list, count and seed always give the same split.

        Args:
            held_out: Number of classes to hold out (int, ``1 .. C-1``), or a fraction in ``(0, 1)`` of them
                (rounded half to even; both sides must be non-empty), where C counts the classes that have images.
            seed: Seed of the class draw.

        Returns:
            ``(kept, held)``: two ImageLists with disjoint classes, each relabelled ``0 .. k-1``.

        Raises:
            TypeError: If ``held_out`` is not an int or a float.
            ValueError: If ``held_out`` is out of range or fewer than two classes have images.
        """
        present = sorted(set(self.labels))
        count = resolve_class_count(held_out, len(present), 'held_out')
        held = set(random.Random(seed).sample(present, count))
        kept = [label for label in present if label not in held]
        return self.subset_classes(kept), self.subset_classes(held)


def resolve_class_count(value: Union[int, float], num_classes: int, name: str) -> int:
    """Turn an int count or a float fraction of ``num_classes`` into a class count in ``1 .. num_classes - 1``.

    Args:
        value: A count (int) or a fraction in ``(0, 1)`` (float, multiplied by ``num_classes`` and rounded with
            Python's ``round``, i.e. half to even: 0.5 of 101 classes gives 50).
        num_classes: Number of classes being split.
        name: Argument name used in error messages.

    Returns:
        The count.

    Raises:
        TypeError: If ``value`` is not an int or a float.
        ValueError: If either side of the split would be empty.
    """
    if num_classes < 2:
        raise ValueError(f'{name}: splitting by class needs at least 2 classes with images, got {num_classes}')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be an int count or a float fraction in (0, 1), got '
                        f'{type(value).__name__} {value!r}')
    if isinstance(value, float):
        if math.isnan(value) or not 0.0 < value < 1.0:
            raise ValueError(f'{name} as a fraction must be in (0, 1), got {value}')
        count = round(value * num_classes)
    else:
        count = value
    if not 1 <= count <= num_classes - 1:
        raise ValueError(f'{name} must leave at least one class on each side: a count in [1, {num_classes - 1}] '
                         f'for {num_classes} classes, got {value!r} ({count} classes)')
    return count


def _check_box(box: Sequence[int], path: str) -> Box:
    if len(box) != 4:
        raise TypeError(f'a box must be (x1, y1, x2, y2), got {box!r} for {path}')
    for v in box:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f'box coordinates must be ints, got {box!r} for {path}')
    x1, y1, x2, y2 = box
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        raise ValueError(f'box must satisfy 0 <= x1 < x2 and 0 <= y1 < y2, got {tuple(box)} for {path}')
    return (x1, y1, x2, y2)
