"""Tiny PNG output without image libraries: a grayscale writer, image grids and line plots.

Training runs on clusters where pillow or matplotlib may be missing, and the plugin needs no image
library either; zlib and struct are enough for 8-bit grayscale PNGs. Plots are bare curves in a frame
(no text): the numbers are in metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from .io.atomic import atomic_write_bytes


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, atomically (a temporary file, then a rename)."""
    array = np.ascontiguousarray(image, dtype=np.uint8)
    if array.ndim != 2:
        raise ValueError(f"write_png: expected a (H, W) uint8 image, got shape {array.shape}")
    height, width = array.shape
    # Each scanline starts with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), array], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    atomic_write_bytes(path, data)


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


def line_plot(x: Sequence[float], y: Sequence[float], *, log_y: bool = False, size: tuple[int, int] = (240, 480)):
    """A (H, W) uint8 plot of y over x: black curve in a grey frame on white; non-finite points are dropped."""
    height, width = size
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if log_y else True)
    xs, ys = xs[keep], ys[keep]
    canvas = np.full(size, 255, np.uint8)
    canvas[[0, -1], :] = canvas[:, [0, -1]] = 160
    if len(xs) < 2:
        return canvas
    if log_y:
        ys = np.log10(ys)
    margin = 4
    px = margin + (xs - xs.min()) / max(np.ptp(xs), 1e-12) * (width - 1 - 2 * margin)
    py = height - 1 - margin - (ys - ys.min()) / max(np.ptp(ys), 1e-12) * (height - 1 - 2 * margin)
    for x0, y0, x1, y1 in zip(px[:-1], py[:-1], px[1:], py[1:], strict=True):
        count = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
        canvas[np.linspace(y0, y1, count).round().astype(int), np.linspace(x0, x1, count).round().astype(int)] = 0
    return canvas
