"""The masks to export: named 2-D label masks from arrays, a folder of TIFFs or a random generator, made or
read one at a time, with names that every common file system takes and that do not collide.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from ..io.tiff_pairs import TIFF_SUFFIXES, read_mask
from ..iscat.masks import random_mask
from .files import ExportError

# Room for "_sNNN.tif" and atomic_open's ".NAME.HOST-PID-RANDOM.tmp" within the 255 bytes most file systems allow.
_MAX_NAME_BYTES = 200
# File names that Windows reserves for devices, whatever follows the first dot.
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))]
)


@dataclass(frozen=True)
class MaskItem:
    """One 2-D label mask to export, with the name its pairs take and where it came from."""

    name: str
    mask: np.ndarray
    source: str


class MaskSequence(Sequence[MaskItem]):
    """Masks made or read one at a time, when an item is asked for: an export holds one mask array at a time.

    Names and sources are known without making a mask. ``folder`` is the folder the masks are read from (None
    when they are not files), so that an export can refuse to write into it.
    """

    def __init__(
        self,
        count: int,
        name: Callable[[int], str],
        source: Callable[[int], str],
        load: Callable[[int], np.ndarray],
        folder: Path | None = None,
    ) -> None:
        self._count = count
        self._name = name
        self._source = source
        self._load = load
        self.folder = folder

    def __len__(self) -> int:
        return self._count

    def name(self, index: int) -> str:
        """The name of mask ``index`` (its pairs are ``NAME_sSSS``), without making the mask."""
        return self._name(range(self._count)[index])

    @overload
    def __getitem__(self, index: int) -> MaskItem: ...

    @overload
    def __getitem__(self, index: slice) -> MaskSequence: ...

    def __getitem__(self, index: int | slice) -> MaskItem | MaskSequence:
        if isinstance(index, slice):
            kept = range(self._count)[index]
            return MaskSequence(
                len(kept),
                lambda i: self._name(kept[i]),
                lambda i: self._source(kept[i]),
                lambda i: self._load(kept[i]),
                self.folder,
            )
        index = range(self._count)[index]  # negative and out-of-range indices as in a list
        return MaskItem(self._name(index), self._load(index), self._source(index))


def safe_name(name: str) -> str:
    """A file-name stem that every common file system takes: anything but letters, digits, ``-``, ``_`` and ``.``
    becomes ``_``; a Windows device name gets a leading ``_``; a long name is cut and ends in a hash of the whole."""
    stem = re.sub(r"[^\w.-]+", "_", name).strip("._") or "mask"
    if stem.split(".")[0].upper() in _WINDOWS_DEVICES:
        stem = f"_{stem}"
    if len(stem.encode()) > _MAX_NAME_BYTES:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        stem = stem.encode()[: _MAX_NAME_BYTES - len(digest) - 1].decode(errors="ignore") + "_" + digest
    return stem


def _check_unique_names(names: Sequence[str], sources: Sequence[str]) -> None:
    """ExportError when two masks get one pair name (compared without case: Windows and macOS file systems)."""
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        first = seen.setdefault(name.casefold(), index)
        if first != index:
            raise ExportError(
                f"{sources[first]} and {sources[index]} both give pairs named {name!r} (names keep letters, "
                "digits, '-', '_' and '.'); rename one of them"
            )


def masks_from_arrays(arrays: Mapping[str, np.ndarray], source: str = "layer") -> list[MaskItem]:
    """Masks from named arrays; a 3-D array (P, H, W) gives one mask per plane, named ``NAME_zPPPP``."""
    items = []
    for name, array in arrays.items():
        array = np.asarray(array)
        stem = safe_name(name)
        if array.ndim == 2:
            items.append(MaskItem(stem, array, f"{source}:{name}"))
        elif array.ndim == 3:
            items += [MaskItem(f"{stem}_z{p:04d}", plane, f"{source}:{name}[{p}]") for p, plane in enumerate(array)]
        else:
            raise ValueError(f"{name}: expected a mask (H, W) or a stack (Z or T, H, W), got shape {array.shape}")
    _check_unique_names([item.name for item in items], [item.source for item in items])
    return items


def masks_from_folder(folder: Path) -> MaskSequence:
    """Every TIFF mask directly in ``folder`` (its ``masks/`` subfolder when it has one), sorted by name.

    Only the file list is read here; each mask is read when its pairs are made. Two files whose names give
    one pair name are refused here, before any work.
    """
    folder = Path(folder)
    if (folder / "masks").is_dir():
        folder = folder / "masks"
    if not folder.is_dir():
        raise ExportError(f"{folder}: not a folder; choose a folder of mask TIFF files")
    paths = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in TIFF_SUFFIXES
    )
    if not paths:
        raise ExportError(f"{folder}: holds no .tif/.tiff masks")
    names = [safe_name(p.stem) for p in paths]
    sources = [str(p) for p in paths]
    _check_unique_names(names, sources)
    return MaskSequence(len(paths), names.__getitem__, sources.__getitem__, lambda i: read_mask(paths[i]), folder)


class _RandomMaskStream:
    """Random masks drawn in order from one generator, as :func:`random_masks` always has (so that an export made
    by an earlier version resumes with the same masks): mask ``i`` needs the draws of masks ``0..i-1``, so the
    stream keeps its place and starts again from the seed only when asked for an earlier mask. Drawing a mask
    costs about 0.5 ms at 256x256, little beside generating its image."""

    def __init__(self, shape: tuple[int, int], seed: int, **options) -> None:
        self._shape = shape
        self._seed = seed
        self._options = options
        self._rng = np.random.default_rng(seed)
        self._next = 0

    def __call__(self, index: int) -> np.ndarray:
        if index < self._next:
            self._rng = np.random.default_rng(self._seed)
            self._next = 0
        while True:
            mask = random_mask(self._shape, rng=self._rng, **self._options).mask
            self._next += 1
            if self._next > index:
                return mask


def random_masks(
    n: int,
    shape: tuple[int, int],
    *,
    particles: int = 20,
    class_proportions: Sequence[float] = (1.0,),
    radius: float = 3.0,
    min_distance: float | None = None,
    seed: int = 0,
) -> MaskSequence:
    """``n`` random particle masks (``iscat.masks.random_mask``) named ``random_NNNNN``; a seed gives the same masks.

    Each mask is drawn when asked for; the first is drawn here, so that bad arguments fail at once.
    """
    if n < 0:
        raise ValueError(f"the number of random masks must be at least 0, got {n}")
    if seed < 0:
        raise ValueError(f"the seed must be at least 0, got {seed}")
    distance = 2 * radius + 2 if min_distance is None else min_distance
    stream = _RandomMaskStream(
        shape, seed, count=particles, min_distance=distance, class_proportions=class_proportions, radius=radius
    )
    if n:
        stream(0)
    return MaskSequence(n, lambda i: f"random_{i:05d}", lambda i: f"random(seed={seed}, index={i})", stream)


def as_mask_sequence(masks: Sequence[MaskItem]) -> MaskSequence:
    """``masks`` as a :class:`MaskSequence` (a list of items, e.g. from :func:`masks_from_arrays`, is wrapped)."""
    if isinstance(masks, MaskSequence):
        return masks
    return MaskSequence(len(masks), lambda i: masks[i].name, lambda i: masks[i].source, lambda i: masks[i].mask)
