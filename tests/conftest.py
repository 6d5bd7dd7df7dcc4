"""Shared fixtures: a tiny generated image-folder data set and the location of the real shared data."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: Real data sets (read-only); override with CGD_HEADS_DATA.
SHARED_DATA = Path(os.environ.get('CGD_HEADS_DATA', REPO.parent / 'shared' / 'data'))


def clustered_maps(num_classes: int, per_class: int, seed: int):
    """Feature maps whose class signal sits in a few channels' maxima, buried in noise: learnable by a head."""
    import torch
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, 16, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    maps = torch.rand(len(labels), 16, 4, 4, generator=g)
    maps[:, :, 0, 0] += 3 * centers[labels].relu() + 0.3 * torch.randn(len(labels), 16, generator=g)
    return maps, labels


def write_shapes_folder(root: Path, num_classes: int = 8, per_class: int = 6, size: int = 24, seed: int = 0) -> Path:
    """Class c = a bright square at a class-specific position and colour, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = root / f'class_{c:02d}'
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            y, x = (c * 5) % (size - 8), (c * 7) % (size - 8)
            img[y:y + 8, x:x + 8] = (np.array([40 * (c % 6), 255 - 30 * c, 120]) + rng.integers(0, 30, 3)).clip(0, 255)
            Image.fromarray(img).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='session', autouse=True)
def isolated_cache(tmp_path_factory):
    """Every test (and the scripts it starts) caches under a temporary folder, never in ``~/.cache/cgd_heads``.

    Cache keys hold the data's absolute paths, so each fresh clone would otherwise leave a new ~170 MB of feature
    maps in the home cache, run after run.
    """
    with pytest.MonkeyPatch.context() as mp:  # the session-wide twin of the monkeypatch fixture
        mp.setenv('CGD_HEADS_CACHE', str(tmp_path_factory.mktemp('cgd_heads_cache')))
        yield


@pytest.fixture
def shapes_folder(tmp_path: Path) -> Path:
    return write_shapes_folder(tmp_path / 'shapes')
