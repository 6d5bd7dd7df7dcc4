"""Helpers shared by the examples: a tiny synthetic image folder and the ``--data`` / ``--out`` folders.

Not an example itself. :func:`write_synthetic_folder` writes a folder-per-class data set with PIL: class ``c`` is
one coloured shape (circle, square, triangle, cross, ring or bar, in a class colour) drawn at a random position and
size on a noisy background, so a small network can tell the classes apart after a few steps. It is what every
example trains and searches on when ``--data`` is omitted.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['write_synthetic_folder', 'data_folder', 'output_folder', 'add_data_arguments', 'add_checkpoint_arguments',
           'checkpoint_or_tiny_model']

SHAPES = ('circle', 'square', 'triangle', 'cross', 'ring', 'bar')
COLOURS = ((230, 60, 50), (50, 170, 60), (60, 90, 230), (240, 200, 40), (200, 70, 200), (40, 200, 210))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0
    if shape == 'circle':
        draw.ellipse(box, fill=colour)
    elif shape == 'square':
        draw.rectangle(box, fill=colour)
    elif shape == 'triangle':
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == 'cross':
        t = max(2, w // 4)
        draw.rectangle((cx - t / 2, y0, cx + t / 2, y1), fill=colour)
        draw.rectangle((x0, cy - t / 2, x1, cy + t / 2), fill=colour)
    elif shape == 'ring':
        draw.ellipse(box, outline=colour, width=max(2, w // 5))
    else:  # bar
        draw.rectangle((x0, cy - max(2, w // 6), x1, cy + max(2, w // 6)), fill=colour)


def write_synthetic_folder(root: Path, num_classes: int = 10, per_class: int = 8, size: int = 48,
                           seed: int = 0) -> Path:
    """Write ``root/class_NN/IIII.png``: ``num_classes`` classes of ``per_class`` RGB images of ``size`` pixels.

    Class ``c`` is shape ``SHAPES[c % 6]`` in colour ``COLOURS[(c + c // 6) % 6]`` (distinct for up to 36 classes),
    at a random position and scale on uniform noise. Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(num_classes):
        shape, colour = SHAPES[c % len(SHAPES)], COLOURS[(c + c // len(SHAPES)) % len(COLOURS)]
        folder = root / f'class_{c:02d}'
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            img = Image.fromarray(background)
            side = int(rng.integers(size // 3, size * 2 // 3 + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
            jitter = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in colour)
            _draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side, y0 + side), jitter)
            img.save(folder / f'{i:04d}.png')
    return root


@contextlib.contextmanager
def data_folder(data: Optional[str], num_classes: int = 10, per_class: int = 8, size: int = 48) -> Iterator[Path]:
    """The image folder to use: ``data`` as given, or a synthetic one in a temporary folder deleted on exit."""
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_dir():
            raise SystemExit(f'--data {data}: not a folder (expected one sub-folder of images per class)')
        yield path
        return
    with tempfile.TemporaryDirectory(prefix='cgd_example_data_') as tmp:
        if os.environ.get('RANK', '0') == '0':  # under torchrun every process writes its own copy: say it once
            print(f'no --data given: writing a synthetic data set of {num_classes} classes x {per_class} images '
                  f'to {tmp}')
        yield write_synthetic_folder(Path(tmp), num_classes, per_class, size)


def output_folder(out: Optional[str], name: str) -> Path:
    """The output folder: ``out`` (created), or a fresh temporary folder (kept, so its files can be looked at)."""
    if out is None:
        return Path(tempfile.mkdtemp(prefix=f'cgd_{name}_'))
    path = Path(out).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _existing_folder(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f'{text} is not a folder (expected one sub-folder of images per class)')
    return text


def add_data_arguments(parser: argparse.ArgumentParser, num_classes: int = 10) -> None:
    """``--data``, ``--out`` and the size of the synthetic data set: what every example accepts."""
    parser.add_argument('--data', default=None, type=_existing_folder,
                        help='image folder, one sub-folder per class (default: a synthetic one in a temp dir)')
    parser.add_argument('--out', default=None, help='output folder (default: a new temporary folder)')
    parser.add_argument('--synthetic-classes', type=int, default=num_classes,
                        help='classes of the synthetic data set written when --data is omitted')
    parser.add_argument('--synthetic-per-class', type=int, default=8,
                        help='images per class of the synthetic data set')


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint`` (a trained model's folder) and ``--img-size`` of the tiny model trained without it."""
    parser.add_argument('--checkpoint', default=None,
                        help='checkpoint folder (e.g. run/best); default: train a tiny model first')
    parser.add_argument('--img-size', type=int, default=48, help='image size of the tiny model trained without '
                                                                  '--checkpoint')


def checkpoint_or_tiny_model(args: argparse.Namespace, images, out: Path):
    """``args.checkpoint``, or the best checkpoint of a few CGD training steps on ``images`` written to ``out``."""
    if args.checkpoint:
        return args.checkpoint
    import cgd_heads  # only the examples that train need it
    config = cgd_heads.TrainConfig(model_name='test_resnet', img_size=args.img_size, embed_dim=64, batch_size=16,
                                   m_per_class=4, epochs=1, iters_per_epoch=6, lr=1e-3, val_classes=0,
                                   device=args.device, num_workers=0, progress=False)
    return cgd_heads.train(config, images, out).best_dir
