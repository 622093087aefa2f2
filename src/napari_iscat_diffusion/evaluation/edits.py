"""Edited masks: move or add particles, to check that generated particles follow the mask to new places."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..iscat.masks import draw_blobs
from .matching import mask_particles, match_points

# Candidate draws per moved or added particle before giving up on it (the mask is then too crowded).
_ATTEMPTS = 200


@dataclass(frozen=True)
class EditedMask:
    """A mask with some blobs moved and some added.

    Attributes:
        mask: (H, W) edited label mask.
        moved_from: (m, 2) old centres (y, x, px) of the moved blobs.
        moved_to: (m, 2) their new centres.
        moved_labels: (m,) their classes.
        added: (a, 2) centres of the added blobs.
        added_labels: (a,) their classes.
    """

    mask: np.ndarray
    moved_from: np.ndarray
    moved_to: np.ndarray
    moved_labels: np.ndarray
    added: np.ndarray
    added_labels: np.ndarray


def edit_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    move: int = 2,
    add: int = 2,
    shift_px: tuple[float, float] = (8.0, 16.0),
    min_distance_px: float = 8.0,
    num_classes: int | None = None,
) -> EditedMask:
    """Move up to ``move`` blobs by a random shift and add up to ``add`` new blobs of random classes.

    New centres keep ``min_distance_px`` from every other blob (old places included, so that a particle left
    behind is not mistaken for the moved one) and one blob radius from the border. Fewer edits come back
    when the mask is too crowded.

    Args:
        mask: (H, W) label mask, 0 background, 1..K classes.
        rng: random generator (the edit depends only on it and the arguments).
        move: blobs to move.
        add: blobs to add.
        shift_px: (min, max) shift of a moved blob, px.
        min_distance_px: smallest distance (px) between a new centre and any other centre.
        num_classes: classes to draw added blobs from (1..K); None: the classes in the mask, or 1.
    """
    mask = np.asarray(mask)
    blobs = mask_particles(mask)
    if not 0 <= shift_px[0] <= shift_px[1]:
        raise ValueError(f"shift_px must be (min, max) with 0 <= min <= max, got {shift_px!r}")
    radius = float(np.median(blobs.radii)) if len(blobs.radii) else 2.0
    height, width = mask.shape
    taken = [tuple(p) for p in blobs.positions]

    def free(point: np.ndarray) -> bool:
        inside = radius <= point[0] <= height - 1 - radius and radius <= point[1] <= width - 1 - radius
        return inside and all(np.hypot(point[0] - y, point[1] - x) >= min_distance_px for y, x in taken)

    edited = mask.copy()
    chosen = rng.permutation(len(blobs.labels))[: max(0, move)]
    moved_from, moved_to, moved_labels = [], [], []
    for i in chosen:
        for _ in range(_ATTEMPTS):
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(*shift_px)
            target = blobs.positions[i] + length * np.array([np.sin(angle), np.cos(angle)])
            if free(target):
                taken.append(tuple(target))
                moved_from.append(blobs.positions[i])
                moved_to.append(target)
                moved_labels.append(blobs.labels[i])
                break
    # Clear the moved blobs' pixels (only those of their own class near the old centre).
    for (y, x), label in zip(moved_from, moved_labels, strict=True):
        yy, xx = np.indices(mask.shape)
        edited[(edited == label) & (np.hypot(yy - y, xx - x) <= 2 * radius + 1)] = 0
    classes = np.unique(blobs.labels) if num_classes is None else np.arange(1, num_classes + 1)
    classes = classes if len(classes) else np.array([1])
    added, added_labels = [], []
    for _ in range(max(0, add)):
        for _ in range(_ATTEMPTS):
            target = rng.uniform([radius, radius], [height - 1 - radius, width - 1 - radius])
            if free(target):
                taken.append(tuple(target))
                added.append(target)
                added_labels.append(int(rng.choice(classes)))
                break
    new_centres = np.array([*moved_to, *added], dtype=np.float64).reshape(-1, 2)
    new_labels = np.array([*moved_labels, *added_labels], dtype=np.int64)
    drawn = draw_blobs(mask.shape, new_centres, new_labels, radius)
    edited[drawn > 0] = drawn[drawn > 0]

    def points(values: list) -> np.ndarray:
        return np.array(values, dtype=np.float64).reshape(-1, 2)

    return EditedMask(
        edited,
        points(moved_from),
        points(moved_to),
        np.array(moved_labels, np.int64),
        points(added),
        np.array(added_labels, np.int64),
    )


def edit_scores(detections: list[np.ndarray], edits: list[EditedMask], tolerance_px: float) -> dict[str, float | None]:
    """How well generated images follow edits: recall at the new places of moved and of added blobs, and the
    ghost rate, the fraction of vacated places where a particle was still detected (None when no such edit)."""
    found_moved = found_added = ghosts = total_moved = total_added = 0
    for positions, edit in zip(detections, edits, strict=True):
        found_moved += len(match_points(positions, edit.moved_to, tolerance_px)[0])
        found_added += len(match_points(positions, edit.added, tolerance_px)[0])
        ghosts += len(match_points(positions, edit.moved_from, tolerance_px)[0])
        total_moved += len(edit.moved_to)
        total_added += len(edit.added)
    return {
        "moved_recall": found_moved / total_moved if total_moved else None,
        "added_recall": found_added / total_added if total_added else None,
        "ghost_rate": ghosts / total_moved if total_moved else None,
        "moved": total_moved,
        "added": total_added,
    }
