"""Random particle masks: positions, size classes and blob label images.

Coordinates are (y, x) in pixels, with pixel ``(i, j)`` centred at ``(i, j)``. Label 0 is background,
labels 1..K are particle classes. numpy only, so the plugin, the command line and training share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Attempts per requested particle before dart throwing gives up (the image is then considered full).
_ATTEMPTS_PER_PARTICLE = 30
_CANDIDATE_BATCH = 1024


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"shape must be two positive integers (height, width), got {shape!r}")
    return int(shape[0]), int(shape[1])


def _check_radius(radius: float) -> None:
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive number of pixels, got {radius!r}")


def _label_dtype(max_label: int) -> type[np.unsignedinteger]:
    if max_label > np.iinfo(np.uint16).max:
        raise ValueError(f"labels must be <= 65535, got {max_label}")
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.uint16


def draw_blobs(shape: tuple[int, int], positions: np.ndarray, labels: np.ndarray, radius: float) -> np.ndarray:
    """Draw one disc of ``radius`` pixels per particle into a label image.

    Args:
        shape: (H, W) of the output.
        positions: (n, 2) float particle centres (y, x) in pixels; sub-pixel and out-of-image centres are fine.
        labels: (n,) integer labels >= 1.
        radius: disc radius in pixels; a pixel belongs to a disc when its centre is within ``radius``.

    Returns:
        (H, W) uint8 label image (uint16 when a label exceeds 255). Where discs overlap, a pixel takes the
        label of the nearest centre, ties going to the particle with the lower index.
    """
    height, width = _check_shape(shape)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2) if np.size(positions) else np.zeros((0, 2))
    labels = np.asarray(labels)
    if labels.shape != (len(positions),):
        raise ValueError(f"labels must have shape ({len(positions)},) to match positions, got {labels.shape}")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 1):
        raise ValueError("labels must be integers >= 1 (0 is background)")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions must be finite")
    _check_radius(radius)

    out = np.zeros((height, width), dtype=_label_dtype(int(labels.max()) if len(labels) else 0))
    # Squared distance to the nearest centre drawn so far; only pixels inside some disc are ever lowered.
    nearest = np.full((height, width), np.inf)
    r2 = radius * radius
    for (y, x), label in zip(positions, labels, strict=True):
        y0, y1 = max(math.ceil(y - radius), 0), min(math.floor(y + radius), height - 1)
        x0, x1 = max(math.ceil(x - radius), 0), min(math.floor(x + radius), width - 1)
        if y0 > y1 or x0 > x1:
            continue
        dy = np.arange(y0, y1 + 1) - y
        dx = np.arange(x0, x1 + 1) - x
        d2 = dy[:, None] ** 2 + dx[None, :] ** 2
        window = nearest[y0 : y1 + 1, x0 : x1 + 1]
        # Strictly closer wins: particles are drawn in index order, so equal distances keep the lower index.
        take = (d2 <= r2) & (d2 < window)
        window[take] = d2[take]
        out[y0 : y1 + 1, x0 : x1 + 1][take] = label
    return out


def random_positions(
    shape: tuple[int, int], count: int, min_distance: float, rng: np.random.Generator, margin: float = 0.0
) -> np.ndarray:
    """Draw up to ``count`` uniformly random positions that keep ``min_distance`` pixels apart.

    Dart throwing with a hash grid of cells ``min_distance`` wide: each candidate is compared with the
    points in the 3x3 neighbouring cells only. After ``30 * count`` candidates, or a batch of 1024 candidates
    without a hit, the image counts as full, so fewer than ``count`` positions may come back.

    Args:
        shape: (H, W) of the image.
        count: number of positions wanted (>= 0).
        min_distance: smallest allowed distance in pixels between two positions (0 for no constraint).
        rng: the random generator (the result depends only on it and the arguments).
        margin: smallest distance in pixels from the outermost pixel centres, so positions lie in
            ``[margin, H - 1 - margin] x [margin, W - 1 - margin]`` (``margin = radius`` keeps whole blobs inside).

    Returns:
        (m, 2) float64 positions (y, x), m <= count, in the order they were accepted.
    """
    height, width = _check_shape(shape)
    if int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if not (math.isfinite(min_distance) and min_distance >= 0):
        raise ValueError(f"min_distance must be a non-negative number of pixels, got {min_distance!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a non-negative number of pixels, got {margin!r}")
    low = np.array([margin, margin])
    span = np.array([height - 1 - 2 * margin, width - 1 - 2 * margin], dtype=np.float64)
    if np.any(span < 0):
        raise ValueError(f"margin={margin} leaves no room in an image of shape {(height, width)}")
    count = int(count)
    if min_distance == 0:
        return low + rng.random((count, 2)) * span

    d2 = min_distance * min_distance
    cells: dict[tuple[int, int], list[tuple[float, float]]] = {}
    accepted: list[tuple[float, float]] = []
    budget = _ATTEMPTS_PER_PARTICLE * count
    while len(accepted) < count and budget > 0:
        batch = low + rng.random((min(budget, _CANDIDATE_BATCH), 2)) * span
        budget -= len(batch)
        before = len(accepted)
        for y, x in batch.tolist():
            cy, cx = int(y // min_distance), int(x // min_distance)
            if not any(
                (y - py) ** 2 + (x - px) ** 2 < d2
                for ny in (cy - 1, cy, cy + 1)
                for nx in (cx - 1, cx, cx + 1)
                for py, px in cells.get((ny, nx), ())
            ):
                cells.setdefault((cy, cx), []).append((y, x))
                accepted.append((y, x))
                if len(accepted) == count:
                    break
        if len(batch) == _CANDIDATE_BATCH and len(accepted) == before:
            break  # a whole batch missed: at most a few per mille of the area is free, so call it full
    return np.array(accepted, dtype=np.float64).reshape(-1, 2)


def classify_by_size(diameters_nm: np.ndarray, bins_nm: Sequence[float]) -> np.ndarray:
    """Map particle diameters (nm) to class labels 1..len(bins_nm) + 1.

    Class 1 is ``d < bins_nm[0]``, class ``i + 1`` is ``bins_nm[i - 1] <= d < bins_nm[i]`` and the last class
    is ``d >= bins_nm[-1]``. ``bins_nm`` must be strictly increasing. Returns an int64 array shaped like the input.
    """
    bins = np.asarray(bins_nm, dtype=np.float64)
    if bins.ndim != 1 or not np.all(np.isfinite(bins)) or np.any(np.diff(bins) <= 0):
        raise ValueError(f"bins_nm must be a finite, strictly increasing sequence, got {list(bins_nm)!r}")
    diameters = np.asarray(diameters_nm, dtype=np.float64)
    if np.any(np.isnan(diameters)):
        raise ValueError("diameters_nm must not contain NaN")
    return np.searchsorted(bins, diameters, side="right").astype(np.int64) + 1


@dataclass(frozen=True)
class RandomMask:
    """A random particle mask with the particles that made it.

    Attributes:
        mask: (H, W) label image, uint8 (uint16 with more than 255 classes); 0 is background.
        positions: (m, 2) float64 particle centres (y, x) in pixels.
        labels: (m,) int64 class of each particle, 1..K.
    """

    mask: np.ndarray
    positions: np.ndarray
    labels: np.ndarray


def random_mask(
    shape: tuple[int, int],
    count: int,
    *,
    min_distance: float,
    class_proportions: Sequence[float],
    radius: float,
    rng: np.random.Generator,
) -> RandomMask:
    """Scatter up to ``count`` particles over an image and draw them as blobs.

    Args:
        shape: (H, W) of the mask.
        count: particles wanted; fewer come back when ``min_distance`` makes the image full.
        min_distance: smallest distance in pixels between particle centres.
        class_proportions: relative frequency of classes 1..K (normalised here; K = its length).
        radius: blob radius in pixels.
        rng: the random generator (the result depends only on it and the arguments).

    Returns:
        A :class:`RandomMask`.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    proportions = np.asarray(class_proportions, dtype=np.float64)
    if proportions.ndim != 1 or len(proportions) == 0:
        raise ValueError("class_proportions must be a non-empty sequence of numbers")
    if not np.all(np.isfinite(proportions)) or np.any(proportions < 0) or not proportions.any():
        raise ValueError(f"class_proportions must be finite, >= 0 and not all 0, got {list(class_proportions)!r}")
    _label_dtype(len(proportions))
    _check_radius(radius)
    positions = random_positions(shape, count, min_distance, rng)
    weights = proportions / proportions.max()  # the sum of proportions near the float maximum would be infinite
    labels = rng.choice(len(weights), size=len(positions), p=weights / weights.sum()).astype(np.int64) + 1
    return RandomMask(draw_blobs(shape, positions, labels, radius), positions, labels)
