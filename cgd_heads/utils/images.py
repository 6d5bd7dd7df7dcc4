"""Image pixels as 8-bit RGB: one rule for what the model is fed (:mod:`cgd_heads.data.image_io`) and what a
retrieval grid shows (:mod:`cgd_heads.retrieval.visualize`)."""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ['to_rgb']


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, the pixels a model is fed and a retrieval grid shows.

    Grayscale and palette images are expanded. Transparent images (RGBA, LA, PA, palette with transparency) are
    composited on white: a plain ``convert('RGB')`` would show whatever colour lies under the transparent pixels,
    usually black. 16/32-bit grayscale and float images (``I;16``, ``I``, ``F``) are rescaled from their own min-max
    to 0-255: ``convert('RGB')`` would clip every value above 255 to white.
    """
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        canvas = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert('RGB')
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        values = np.asarray(img, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8)).convert('RGB')
    return img.convert('RGB')
