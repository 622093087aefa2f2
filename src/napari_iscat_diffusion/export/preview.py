"""A PNG preview of an export: its first pairs, mask left and image right."""

from __future__ import annotations

import heapq
from pathlib import Path

import numpy as np

from ..io.tiff_pairs import read_image, read_mask
from ..png import grid, to_uint8, write_png
from ..synthetic import contrast_limits
from .files import ExportError, check_output_paths, file_errors
from .manifest import complete_rows, manifest_files


def write_preview(folder: Path, path: Path, count: int = 4) -> Path:
    """Write a PNG of the first ``count`` pairs of an export: one row per pair, mask left and image right.

    Images are shown symmetric around their median (``contrast_limits``), masks from 0 to their largest label.
    Pairs of another size than the first are left out, so that the tiles form a grid.
    """
    folder = Path(folder)
    # a pair may be listed twice (a merge cut short), so take enough rows for ``count`` distinct ones
    first = heapq.nsmallest(count * len(manifest_files(folder)), complete_rows(folder), key=lambda r: int(r["pair"]))
    rows = list({row["name"]: row for row in first}.values())
    if not rows:
        raise ExportError(f"{folder}: holds no finished pairs to preview")
    tiles: list[list[np.ndarray]] = []
    for row in rows[:count]:
        mask = read_mask(folder / row["mask"])
        image = read_image(folder / row["image"])
        image = image[0] if image.ndim == 3 else image  # the first channel of a multi-channel model
        if tiles and mask.shape != tiles[0][0].shape:
            continue
        tiles.append([to_uint8(mask, 0, max(int(mask.max()), 1)), to_uint8(image, *contrast_limits(image))])
    check_output_paths(folder, path)
    with file_errors(Path(path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_png(path, grid(tiles))
    return Path(path)
