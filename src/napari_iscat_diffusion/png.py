"""Grayscale PNG output from numpy arrays: a writer (pillow) and image grids (training's sample grids, the export's
previews)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from .io.atomic import atomic_write_bytes


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, atomically (a temporary file, then a rename)."""
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 2:
        raise ValueError(f"write_png: expected a (H, W) uint8 image, got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def to_uint8(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255 (clipped)."""
    scaled = (np.asarray(image, dtype=np.float64) - low) / max(high - low, 1e-12)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile uint8 (h, w) tiles of one size into rows with a white ``gap`` px between tiles."""
    height, width = rows[0][0].shape
    columns = max(len(row) for row in rows)
    out = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            out[r * (height + gap) : r * (height + gap) + height, c * (width + gap) : c * (width + gap) + width] = tile
    return out
