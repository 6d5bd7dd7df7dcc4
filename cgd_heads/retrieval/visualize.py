"""Retrieval result grids: one row per query, the query then its top-k results framed green (same label) or red.

Drawn with PIL only. Every image is letterboxed: scaled (up or down, aspect ratio kept) to fit a
``thumb_size x thumb_size`` square and centred on the background colour, so images of any size and mode
(grayscale, palette, RGBA, 16-bit) line up. Each thumbnail sits inside a frame of ``border`` pixels:

* query: blue;
* result whose label equals the query's: green;
* result whose label differs: red;
* result where either label is None (unknown): gray.

Layout (pixels): a cell is ``thumb_size + 2 * border`` wide and high, cells are ``gap`` apart with a margin of
``gap`` around the grid, and the query column is followed by an extra ``gap``. Rows with fewer results than the
longest row are left blank on the right.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ..utils.atomic import atomic_path
from ..utils.checks import PathLike, check_int
from ..utils.images import to_rgb

__all__ = ['save_retrieval_grid', 'grid_cell_box', 'QUERY_COLOR', 'CORRECT_COLOR', 'WRONG_COLOR', 'UNKNOWN_COLOR']

QUERY_COLOR = (40, 90, 220)
CORRECT_COLOR = (0, 200, 0)
WRONG_COLOR = (220, 0, 0)
UNKNOWN_COLOR = (150, 150, 150)

#: A path to an image file, a PIL image, or an image tensor/array: ``(H, W)``, ``(1|3, H, W)`` torch tensor,
#: ``(H, W, 1|3)`` numpy array; uint8 in [0, 255] or float in [0, 1].
ImageSource = Union[str, os.PathLike, Image.Image, torch.Tensor, np.ndarray]


def grid_cell_box(row: int, col: int, thumb_size: int, border: int, gap: int) -> Tuple[int, int, int, int]:
    """Outer ``(left, top, right, bottom)`` box (right/bottom exclusive) of the framed cell at ``row``, ``col``.

    Column 0 is the query. ``left = gap + col * (cell + gap) + (gap if col >= 1 else 0)`` and
    ``top = gap + row * (cell + gap)`` with ``cell = thumb_size + 2 * border``.
    """
    cell = thumb_size + 2 * border
    left = gap + col * (cell + gap) + (gap if col >= 1 else 0)
    top = gap + row * (cell + gap)
    return left, top, left + cell, top + cell


def _to_pil(source: Any, name: str) -> Image.Image:
    """Open or convert one image source to an RGB PIL image."""
    if isinstance(source, (str, os.PathLike)):
        try:
            with Image.open(source) as img:
                img.load()
                return to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ValueError(f'{name} could not be read as an image: {os.fspath(source)!r} ({exc})') from exc
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, torch.Tensor):
        if source.ndim == 3:  # CHW -> HWC, numpy's layout
            source = source.permute(1, 2, 0)
        source = source.detach().cpu()
        # bf16 / fp16 have no (or a lossy) numpy form: floats go through float32, like embeddings
        source = (source.float() if source.is_floating_point() else source).numpy()
    if isinstance(source, np.ndarray):
        return _array_to_pil(source, name)
    raise TypeError(
        f'{name} must be a path, PIL.Image, torch.Tensor or numpy.ndarray, got {type(source).__name__}'
    )


def _array_to_pil(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f'{name} must be (H, W) or (H, W, 1|3) ((C, H, W) for tensors), got shape {array.shape}')
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype.kind == 'f':
        if not np.isfinite(array).all():
            raise ValueError(f'{name} contains NaN or inf')
        # float images are [0, 1] by convention (torchvision's ToTensor); out-of-range values are clipped
        pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        raise TypeError(f'{name} must be uint8 in [0, 255] or float in [0, 1], got dtype {array.dtype}')
    return to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))


def _letterbox(img: Image.Image, size: int, background: Tuple[int, int, int]) -> Image.Image:
    fitted = ImageOps.contain(img, (size, size), method=Image.Resampling.BICUBIC)
    canvas = Image.new('RGB', (size, size), background)
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return canvas


def _as_list(value: Any, name: str, length: Optional[int] = None) -> List[Any]:
    """``value`` as a list, checking it is a sequence (not a str) and, if ``length`` is given, its length."""
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, (Sequence, np.ndarray, torch.Tensor)):
        raise TypeError(f'{name} must be a sequence (list, tuple, array), got {type(value).__name__}')
    if length is not None and len(value) != length:
        raise ValueError(f'{name} must have {length} entries (one per query or result), got {len(value)}')
    return list(value)


def _frame_color(query_label: Any, result_label: Any) -> Tuple[int, int, int]:
    if query_label is None or result_label is None:
        return UNKNOWN_COLOR
    return CORRECT_COLOR if _label_value(query_label) == _label_value(result_label) else WRONG_COLOR


def _label_value(label: Any) -> Any:
    # tensors/arrays of one element compare by value (a 0-d tensor == tensor is a tensor, not a bool)
    if isinstance(label, (torch.Tensor, np.ndarray, np.generic)):
        return label.item()
    return label


def save_retrieval_grid(
    query_paths: Sequence[ImageSource],
    query_labels: Sequence[Any],
    result_paths: Sequence[Sequence[ImageSource]],
    result_labels: Sequence[Sequence[Any]],
    out_path: PathLike,
    thumb_size: int = 96,
    border: int = 6,
    gap: int = 8,
    background: Tuple[int, int, int] = (255, 255, 255),
) -> Path:
    """Draw a retrieval grid and write it atomically as a PNG.

    Args:
        query_paths: One image per query: a path, PIL image, or image tensor/array (see :data:`ImageSource`).
        query_labels: One label per query (any type compared with ``==``; None = unknown).
        result_paths: Per query, its results best first (rows may differ in length, and may be empty).
        result_labels: Per query, one label per result, matching ``result_paths`` row by row.
        out_path: Destination ``.png`` file; its folder must exist.
        thumb_size: Side of the square each image is letterboxed into, pixels (>= 1).
        border: Frame width around each thumbnail, pixels (>= 1).
        gap: Space between cells and around the grid, pixels (>= 0).
        background: RGB colour of the canvas and of letterbox bars.

    Returns:
        ``out_path`` as a Path. The image is ``W x H`` with ``cell = thumb_size + 2 * border``,
        ``W = (1 + max_k) * cell + (max_k + 3) * gap`` and ``H = rows * cell + (rows + 1) * gap``, where
        ``max_k >= 1`` is the longest result row (``W = cell + 2 * gap`` when every row is empty); cell
        positions: :func:`grid_cell_box`.

    Raises:
        ValueError: mismatched lengths, no query, a suffix other than ``.png``, unreadable images.
        TypeError: arguments of the wrong type.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != '.png':
        raise ValueError(f'out_path must end in .png (the grid is written as PNG), got {str(out_path)!r}')
    thumb_size = check_int(thumb_size, 'thumb_size')
    border = check_int(border, 'border')
    gap = check_int(gap, 'gap', minimum=0)
    if (
        not isinstance(background, (tuple, list)) or len(background) != 3
        or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in background)
    ):
        raise ValueError(f'background must be an (R, G, B) tuple of ints in [0, 255], got {background!r}')
    background = tuple(int(c) for c in background)
    queries = _as_list(query_paths, 'query_paths')
    if not queries:
        raise ValueError('query_paths must hold at least one query, got none')
    q_labels = _as_list(query_labels, 'query_labels', len(queries))
    rows = [
        _as_list(row, f'result_paths[{i}]')
        for i, row in enumerate(_as_list(result_paths, 'result_paths', len(queries)))
    ]
    row_labels = [
        _as_list(labels, f'result_labels[{i}]', len(rows[i]))
        for i, labels in enumerate(_as_list(result_labels, 'result_labels', len(queries)))
    ]

    max_k = max(len(paths) for paths in rows)
    cell = thumb_size + 2 * border
    width = (1 + max_k) * cell + (max_k + 3) * gap if max_k else cell + 2 * gap
    height = len(queries) * cell + (len(queries) + 1) * gap
    grid = Image.new('RGB', (width, height), background)
    for row, (query, query_label) in enumerate(zip(queries, q_labels)):
        cells = [(query, QUERY_COLOR, f'query_paths[{row}]')]
        cells += [
            (result, _frame_color(query_label, label), f'result_paths[{row}][{col}]')
            for col, (result, label) in enumerate(zip(rows[row], row_labels[row]))
        ]
        for col, (source, color, name) in enumerate(cells):
            left, top, right, bottom = grid_cell_box(row, col, thumb_size, border, gap)
            grid.paste(color, (left, top, right, bottom))
            grid.paste(_letterbox(_to_pil(source, name), thumb_size, background), (left + border, top + border))

    with atomic_path(out_path) as tmp:
        grid.save(tmp, format='PNG')
    return out_path
