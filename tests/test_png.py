"""Grayscale PNGs: exact pixel values in the file, nothing half-written, and the tile grid's layout."""

import numpy as np
import pytest
from PIL import Image

from napari_iscat_diffusion.png import grid, to_uint8, write_png


def test_a_png_holds_the_exact_pixel_values(tmp_path):
    image = np.arange(256, dtype=np.uint8).reshape(8, 32)
    path = tmp_path / "image.png"
    write_png(path, image)
    with Image.open(path) as png:
        assert png.mode == "L" and png.size == (32, 8)
        assert np.array_equal(np.asarray(png), image)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"expected a \(H, W\) uint8 image"):
        write_png(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))


def test_values_map_to_bytes_and_tiles_sit_in_rows_with_white_gaps():
    assert to_uint8(np.array([-1.0, 0.0, 0.5, 1.0, 2.0]), 0.0, 1.0).tolist() == [0, 0, 128, 255, 255]
    tiles = [[np.zeros((2, 3), np.uint8), np.full((2, 3), 7, np.uint8)], [np.full((2, 3), 9, np.uint8)]]
    out = grid(tiles, gap=1)
    assert out.shape == (5, 7)
    assert (out[:2, :3] == 0).all() and (out[:2, 4:] == 7).all() and (out[3:, :3] == 9).all()
    assert (out[2] == 255).all() and (out[:2, 3] == 255).all() and (out[3:, 4:] == 255).all()
