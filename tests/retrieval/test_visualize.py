"""save_retrieval_grid: PNG size, frame colours, letterboxing and argument validation."""
import numpy as np
import pytest
import torch
from PIL import Image

from cgd_heads.retrieval.visualize import (
    CORRECT_COLOR,
    QUERY_COLOR,
    UNKNOWN_COLOR,
    WRONG_COLOR,
    grid_cell_box,
    save_retrieval_grid,
)

THUMB, BORDER, GAP = 40, 5, 4


def frame_pixels(img: Image.Image, row: int, col: int):
    """Pixels in the middle of each of the four frame sides of a cell."""
    left, top, right, bottom = grid_cell_box(row, col, THUMB, BORDER, GAP)
    mid_x, mid_y, inset = (left + right) // 2, (top + bottom) // 2, BORDER // 2
    return {img.getpixel(p) for p in [(mid_x, top + inset), (mid_x, bottom - 1 - inset),
                                       (left + inset, mid_y), (right - 1 - inset, mid_y)]}


@pytest.fixture()
def images(tmp_path):
    """Files of different sizes and modes, each one solid colour."""
    specs = {
        'red_wide.png': Image.new('RGB', (120, 30), (200, 30, 30)),
        'gray_tall.png': Image.new('L', (10, 70), 128),
        'blue_small.jpg': Image.new('RGB', (8, 8), (20, 20, 220)),
        'rgba.png': Image.new('RGBA', (50, 50), (10, 200, 10, 255)),
    }
    paths = {}
    for name, img in specs.items():
        img.save(tmp_path / name)
        paths[name] = tmp_path / name
    return paths


def test_grid_size_and_frames(tmp_path, images):
    out = tmp_path / 'grid.png'
    tensor = torch.zeros(3, 16, 24)  # float CHW in [0, 1]: black
    result = save_retrieval_grid(
        query_paths=[images['red_wide.png'], images['gray_tall.png']],
        query_labels=[1, 2],
        result_paths=[
            [images['blue_small.jpg'], images['rgba.png'], str(images['gray_tall.png'])],
            [Image.new('L', (30, 30), 0), tensor],
        ],
        result_labels=[[1, 3, 1], [2, None]],
        out_path=out,
        thumb_size=THUMB,
        border=BORDER,
        gap=GAP,
    )
    assert result == out
    img = Image.open(out)
    assert img.format == 'PNG' and img.mode == 'RGB'
    cell = THUMB + 2 * BORDER
    assert img.size == (4 * cell + 6 * GAP, 2 * cell + 3 * GAP)

    assert frame_pixels(img, 0, 0) == {QUERY_COLOR}
    assert frame_pixels(img, 0, 1) == {CORRECT_COLOR}  # label 1 == 1
    assert frame_pixels(img, 0, 2) == {WRONG_COLOR}  # label 3 != 1
    assert frame_pixels(img, 0, 3) == {CORRECT_COLOR}
    assert frame_pixels(img, 1, 0) == {QUERY_COLOR}
    assert frame_pixels(img, 1, 1) == {CORRECT_COLOR}  # label 2 == 2
    assert frame_pixels(img, 1, 2) == {UNKNOWN_COLOR}  # None: unknown
    # the short second row leaves its last cell blank (background)
    left, top, right, bottom = grid_cell_box(1, 3, THUMB, BORDER, GAP)
    assert (np.asarray(img.crop((left, top, right, bottom))) == 255).all()

    # letterboxing: the 4:1 red image fills the thumbnail's width, background bars above and below
    left, top, _, _ = grid_cell_box(0, 0, THUMB, BORDER, GAP)
    x0, y0 = left + BORDER, top + BORDER
    assert img.getpixel((x0 + THUMB // 2, y0 + THUMB // 2)) == (200, 30, 30)
    assert img.getpixel((x0 + THUMB // 2, y0 + 2)) == (255, 255, 255)
    # grayscale becomes gray RGB; the black tensor is black
    left, top, _, _ = grid_cell_box(1, 0, THUMB, BORDER, GAP)
    assert img.getpixel((left + BORDER + THUMB // 2, top + BORDER + THUMB // 2)) == (128, 128, 128)
    left, top, _, _ = grid_cell_box(1, 2, THUMB, BORDER, GAP)
    assert img.getpixel((left + BORDER + THUMB // 2, top + BORDER + THUMB // 2)) == (0, 0, 0)


def test_sixteen_bit_grayscale_is_rescaled_not_saturated(tmp_path):
    # values up to 60000: a plain convert('RGB') would clip everything above 255 to white
    ramp = Image.fromarray(np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (64, 1)))
    assert ramp.mode.startswith('I;16')
    out = save_retrieval_grid([ramp], [0], [[]], [[]], tmp_path / 'g.png', thumb_size=64, border=BORDER, gap=GAP)
    img = Image.open(out)
    assert img.size == (64 + 2 * BORDER + 2 * GAP,) * 2
    left, top, _, _ = grid_cell_box(0, 0, 64, BORDER, GAP)
    row = np.asarray(img)[top + BORDER + 32, left + BORDER:left + BORDER + 64, 0].astype(int)
    assert row[0] < 10 and row[-1] > 245 and 100 < row[32] < 155


def test_written_atomically(tmp_path, images, monkeypatch):
    out = tmp_path / 'grid.png'
    out.write_bytes(b'previous')

    def broken_save(self, fp, format=None, **params):
        raise OSError('disk full')

    monkeypatch.setattr(Image.Image, 'save', broken_save)
    with pytest.raises(OSError, match='disk full'):
        save_retrieval_grid([images['rgba.png']], [0], [[images['rgba.png']]], [[0]], out)
    assert out.read_bytes() == b'previous'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['grid.png', *images])


@pytest.mark.parametrize('kwargs, error, match', [
    ({'query_labels': [0, 1]}, ValueError, r'query_labels must have 1 entries'),
    ({'result_paths': []}, ValueError, r'result_paths must have 1 entries'),
    ({'result_labels': [[0]]}, ValueError, r'result_labels\[0\] must have 2 entries'),
    ({'query_paths': []}, ValueError, 'at least one query'),
    ({'query_paths': 'a.png'}, TypeError, 'query_paths must be a sequence'),
    ({'out_path': 'grid.jpg'}, ValueError, 'must end in .png'),
    ({'thumb_size': 0}, ValueError, 'thumb_size must be a positive int, got 0'),
    ({'border': 2.5}, TypeError, 'border must be a positive int, got float 2.5'),
    ({'background': (0, 0, 300)}, ValueError, 'background must be an'),
    ({'result_paths': [[np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.uint8)]]}, ValueError,
     r'result_paths\[0\]\[0\] must be \(H, W\)'),
    ({'result_paths': [['missing.png', 'missing.png']]}, ValueError, r'result_paths\[0\]\[0\] could not be read'),
    ({'result_paths': [[3, 4]]}, TypeError, r'result_paths\[0\]\[0\] must be a path'),
])
def test_bad_arguments(tmp_path, images, kwargs, error, match):
    args = {
        'query_paths': [images['rgba.png']],
        'query_labels': [0],
        'result_paths': [[images['rgba.png'], images['gray_tall.png']]],
        'result_labels': [[0, 1]],
        'out_path': tmp_path / 'grid.png',
        **kwargs,
    }
    if 'out_path' in kwargs:
        args['out_path'] = tmp_path / kwargs['out_path']
    with pytest.raises(error, match=match):
        save_retrieval_grid(**args)
    assert not (tmp_path / 'grid.png').exists()


def test_half_precision_tensors_are_drawn_like_float32(tmp_path):
    image = torch.rand(3, 16, 16)
    grids = [np.asarray(Image.open(save_retrieval_grid([image.to(dtype)], [0], [[]], [[]], tmp_path / f'{i}.png',
                                                       thumb_size=16, border=BORDER, gap=GAP)))
             for i, dtype in enumerate((torch.float32, torch.bfloat16))]
    # bf16 keeps 8 bits of mantissa: each pixel within one or two of the float32 drawing
    assert grids[0].shape == grids[1].shape and np.abs(grids[0].astype(int) - grids[1]).max() <= 2
