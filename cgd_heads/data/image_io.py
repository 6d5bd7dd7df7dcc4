"""Reading one image file: decode with PIL, convert to RGB (:func:`~cgd_heads.utils.images.to_rgb`), crop to a
box; errors name the file.

PIL's own exceptions ("cannot identify image file <_io.BufferedReader ...>", "image file is truncated") often do
not say which of thousands of files failed, especially inside a DataLoader worker. Every failure here is
re-raised as :class:`BadImageError` (or ``FileNotFoundError`` for a missing file) with the path in the message.
PIL's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never changed: a truncated file is an error, not grey pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence

from PIL import Image

from ..utils.images import to_rgb

__all__ = ['BadImageError', 'load_rgb_image', 'verify_image']

# What PIL raises for undecodable data: OSError (truncated, UnidentifiedImageError), SyntaxError (some corrupt
# headers), ValueError/EOFError (broken chunks) and DecompressionBombError (absurd sizes).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class BadImageError(OSError):
    """An image file exists but cannot be decoded (not an image, truncated, corrupt). The message names it."""


def _open_loaded(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            # load() inside the with-block forces a full decode, which is where truncation shows up
            img.load()
            return img.copy() if img.mode == 'RGB' else to_rgb(img)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'image file not found: {path}') from e
    except IsADirectoryError as e:
        raise BadImageError(f'cannot read image {path}: it is a directory') from e
    except _DECODE_ERRORS as e:
        raise BadImageError(f'cannot read image {path}: {type(e).__name__}: {e}') from e


def load_rgb_image(path: str, box: Optional[Sequence[int]] = None) -> Image.Image:
    """Decode an image as RGB (grayscale and palette images are expanded), optionally cropped.

    The pixels are used as stored: an EXIF orientation tag is not applied (as torchvision and timm do not), so
    training, the gallery and the queries all see the same orientation of a file.

    Args:
        path: Image file.
        box: Optional ``(x1, y1, x2, y2)`` crop box in pixels, right/bottom exclusive. It is clipped to the image
            so a box that overshoots by a pixel (common in hand-made annotations) does not add black borders.

    Returns:
        The RGB PIL image.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        BadImageError: If the file cannot be decoded.
        ValueError: If the box lies outside the image.
    """
    img = _open_loaded(path)
    if box is None:
        return img
    x1, y1, x2, y2 = (int(v) for v in box)
    width, height = img.size
    x1, y1 = max(x1, 0), max(y1, 0)
    x2, y2 = min(x2, width), min(y2, height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f'crop box {tuple(box)} of image {path} does not overlap the image ({width}x{height})')
    return img.crop((x1, y1, x2, y2))


def verify_image(path: str) -> Optional[str]:
    """Fully decode an image to check it is readable.

    Args:
        path: Image file.

    Returns:
        ``None`` if the image decodes, otherwise the error message (which names the file).
    """
    try:
        _open_loaded(path)
    except (BadImageError, FileNotFoundError) as e:
        return str(e)
    return None
