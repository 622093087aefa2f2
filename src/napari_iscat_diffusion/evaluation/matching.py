"""Mask fidelity: match detected particles to the blobs of the conditioning mask, per class.

Matching is one-to-one (Hungarian assignment on distances) within a tolerance in pixels. The detector
does not know classes, so a matched detection counts for the class of its blob; an unmatched detection
(false positive) is charged to the class of the nearest blob in its image, since spurious peaks mostly
come from that particle's rings; in an image without blobs it is charged to class 0 ("no particle").

A border strip can be left out of the counts: a particle cut by the image edge shows only part of its
pattern, so neither the detector nor a generator can be judged on it. Matching still uses everything
(a detection just outside the strip may find a blob inside it); only blobs and unmatched detections whose
centres lie in the strip are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.measure import regionprops

from ..diffusion.particle_contrast import particle_blobs


@dataclass(frozen=True)
class MaskParticles:
    """The blobs of a label mask.

    Attributes:
        positions: (n, 2) float64 blob centroids (y, x) in pixels.
        labels: (n,) int64 class of each blob (the mask value, 1..K).
        radii: (n,) float64 equivalent disc radius of each blob, ``sqrt(area / pi)`` in pixels.
    """

    positions: np.ndarray
    labels: np.ndarray
    radii: np.ndarray


def mask_particles(mask: np.ndarray) -> MaskParticles:
    """The connected blobs of a 2-D label mask (0 background); touching blobs of different classes stay apart."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer label mask (H, W), got {mask.dtype} with shape {mask.shape}")
    if mask.size and mask.min() < 0:
        raise ValueError("mask labels must be >= 0")
    regions = regionprops(particle_blobs(mask)[0], intensity_image=mask)
    positions = np.array([r.centroid for r in regions], dtype=np.float64).reshape(-1, 2)
    labels = np.array([int(r.intensity_max) for r in regions], dtype=np.int64)
    radii = np.sqrt(np.array([r.area for r in regions], dtype=np.float64) / np.pi)
    return MaskParticles(positions, labels, radii)


def match_points(detected: np.ndarray, true: np.ndarray, tolerance_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of detected to true positions (both (n, 2), px) that maximises the number of pairs
    within ``tolerance_px`` and, among those, minimises the summed distance.

    Returns:
        (detected_indices, true_indices) of the matched pairs, int64 arrays of equal length.
    """
    detected = np.asarray(detected, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    if not tolerance_px > 0:
        raise ValueError(f"tolerance_px must be positive, got {tolerance_px!r}")
    if len(detected) == 0 or len(true) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    distance = np.hypot(*(detected[:, None, :] - true[None, :, :]).transpose(2, 0, 1))
    # A pair beyond the tolerance costs more than all allowed pairs together, so the assignment first
    # maximises the number of allowed pairs.
    penalty = 1.0 + tolerance_px * min(len(detected), len(true))
    rows, cols = linear_sum_assignment(np.where(distance <= tolerance_px, distance, penalty))
    ok = distance[rows, cols] <= tolerance_px
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64)


@dataclass
class MatchCounts:
    """True positives, false positives and false negatives of one class; scores are None when undefined."""

    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP)."""
        found = self.true_positives + self.false_positives
        return self.true_positives / found if found else None

    @property
    def recall(self) -> float | None:
        """TP / (TP + FN)."""
        present = self.true_positives + self.false_negatives
        return self.true_positives / present if present else None

    @property
    def f1(self) -> float | None:
        """2 TP / (2 TP + FP + FN)."""
        total = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 2 * self.true_positives / total if total else None

    def add(self, other: MatchCounts) -> None:
        """Add another count in place."""
        self.true_positives += other.true_positives
        self.false_positives += other.false_positives
        self.false_negatives += other.false_negatives

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready counts and scores."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "true_positives": self.true_positives,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
        }


def match_image(
    detected: np.ndarray,
    true: np.ndarray,
    true_labels: np.ndarray,
    tolerance_px: float,
    *,
    image_shape: tuple[int, int] | None = None,
    border_px: float = 0.0,
) -> dict[int, MatchCounts]:
    """Per-class counts for one image: detected (n, 2) against true positions (m, 2) with labels (m,).

    With ``image_shape`` (H, W) and ``border_px`` > 0, blobs and unmatched detections whose centres lie
    closer than ``border_px`` to the image edge are not counted (see the module docstring).
    """
    detected = np.asarray(detected, dtype=np.float64).reshape(-1, 2)
    true = np.asarray(true, dtype=np.float64).reshape(-1, 2)
    true_labels = np.asarray(true_labels, dtype=np.int64)
    if true_labels.shape != (len(true),):
        raise ValueError(f"true_labels must have shape ({len(true)},), got {true_labels.shape}")
    if border_px < 0 or (border_px > 0 and image_shape is None):
        raise ValueError(f"border_px must be >= 0 and needs image_shape, got {border_px!r} and {image_shape!r}")
    det_idx, true_idx = match_points(detected, true, tolerance_px)
    counted_true = _inside(true, image_shape, border_px)
    counts = {int(k): MatchCounts() for k in np.unique(true_labels[counted_true])}
    matched_true = np.zeros(len(true), bool)
    matched_true[true_idx] = True
    for k, c in counts.items():
        of_class = (true_labels == k) & counted_true
        c.true_positives = int(np.sum(matched_true & of_class))
        c.false_negatives = int(np.sum(~matched_true & of_class))
    spurious = np.setdiff1d(np.arange(len(detected)), det_idx)
    spurious = spurious[_inside(detected[spurious], image_shape, border_px)]
    for i in spurious:
        k = int(true_labels[np.argmin(np.hypot(*(true - detected[i]).T))]) if len(true) else 0
        counts.setdefault(k, MatchCounts()).false_positives += 1
    return counts


def _inside(points: np.ndarray, image_shape: tuple[int, int] | None, border_px: float) -> np.ndarray:
    """Which points (n, 2) lie at least ``border_px`` from every edge of an image of ``image_shape``."""
    if not border_px:
        return np.ones(len(points), bool)
    high = np.array(image_shape, dtype=np.float64) - 1 - border_px
    return np.all((points >= border_px) & (points <= high), axis=1)


def fidelity_scores(per_image: Iterable[dict[int, MatchCounts]]) -> dict[str, dict]:
    """Sum per-image counts: ``{"per_class": {"1": {...}, ...}, "all": {...}}`` (micro-averaged over classes)."""
    totals: dict[int, MatchCounts] = {}
    overall = MatchCounts()
    for counts in per_image:
        for k, c in counts.items():
            totals.setdefault(k, MatchCounts()).add(c)
            overall.add(c)
    return {"per_class": {str(k): totals[k].to_dict() for k in sorted(totals)}, "all": overall.to_dict()}
