"""HDF5 patch files: ``image_patches`` (N, Z, H, W) with ``mask_patches`` (N, C, H, W), one binary mask per class.

h5py is optional for the plugin, so it is imported only when an HDF5 file is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from .tiff_pairs import MAX_TIFF_BYTES, DataError

IMAGE_PATCHES = "image_patches"
MASK_PATCHES = "mask_patches"
HDF5_SUFFIXES = (".h5", ".hdf5")
# Class masks become a uint8 label image, as in a mask TIFF; models know at most as many classes.
MAX_CLASSES = 255


def import_h5py() -> ModuleType:
    """Return the h5py module, or raise ModuleNotFoundError saying how to install it."""
    try:
        import h5py
    except ImportError as exc:
        raise ModuleNotFoundError(
            "reading HDF5 datasets needs h5py: pip install h5py (or napari-iscat-diffusion[train])"
        ) from exc
    return h5py


@dataclass(frozen=True)
class PatchLayout:
    """Sizes of an HDF5 patch file: patches, image planes, mask classes, height and width."""

    count: int
    planes: int
    classes: int
    height: int
    width: int


def patch_layout(h5file, path: Path | str) -> PatchLayout:
    """Check that an open h5py file has the expected datasets and shapes; ``path`` names it in errors."""
    missing = [name for name in (IMAGE_PATCHES, MASK_PATCHES) if name not in h5file]
    if missing:
        found = ", ".join(sorted(h5file.keys())) or "nothing"
        raise DataError(
            path,
            f"no dataset {' or '.join(missing)} (found: {found}); expected {IMAGE_PATCHES} "
            f"(N, Z, H, W) and {MASK_PATCHES} (N, C, H, W)",
        )
    images, masks = _dataset(h5file, IMAGE_PATCHES, path), _dataset(h5file, MASK_PATCHES, path)
    if images.ndim != 4:
        raise DataError(path, f"{IMAGE_PATCHES} has shape {images.shape}; expected (N, Z, H, W)")
    if masks.ndim != 4:
        raise DataError(
            path, f"{MASK_PATCHES} has shape {masks.shape}; expected (N, C, H, W), one binary mask per class"
        )
    if images.shape[0] != masks.shape[0] or images.shape[2:] != masks.shape[2:]:
        raise DataError(path, f"{IMAGE_PATCHES} {images.shape} and {MASK_PATCHES} {masks.shape} differ in N, H or W")
    count, planes, height, width = images.shape
    classes = masks.shape[1]
    if classes > MAX_CLASSES:
        raise DataError(path, f"{MASK_PATCHES} has {classes} classes, more than {MAX_CLASSES}")
    # Chunks that were never written take no space: a file of a few kB can claim patches of many GB.
    patch_bytes = (planes * images.dtype.itemsize + classes * masks.dtype.itemsize) * height * width
    if patch_bytes > MAX_TIFF_BYTES:
        raise DataError(
            path,
            f"one patch of {IMAGE_PATCHES} and {MASK_PATCHES} is {patch_bytes / 2**30:.1f} GiB, more than the "
            f"{MAX_TIFF_BYTES >> 30} GiB of one TIFF image",
        )
    return PatchLayout(count, planes, classes, height, width)


def _dataset(h5file, name: str, path: Path | str):
    """The dataset ``name`` of an open h5py file if it holds booleans, integers or floats; DataError else."""
    try:
        dataset = h5file[name]
    except (KeyError, OSError) as exc:  # a link to a missing file or object
        raise DataError(path, f"cannot open {name} ({' '.join(str(exc).split())})") from exc
    dtype = getattr(dataset, "dtype", None)  # a group has none
    if dtype is None:
        raise DataError(path, f"{name} is not a dataset; expected an array of numbers")
    if dtype.kind not in "biuf":
        raise DataError(path, f"{name} holds {dtype} values; expected numbers")
    return dataset


def labels_from_class_masks(masks: np.ndarray) -> np.ndarray:
    """Turn per-class binary masks (..., C, H, W) into label images (..., H, W).

    Pixel label is ``c + 1`` where class mask ``c`` is nonzero, 0 where none is. Where class masks overlap the
    higher class index wins (as if the classes were painted in order). Returns uint8 (uint16 above 255 classes).
    """
    masks = np.asarray(masks)
    if masks.ndim < 3:
        raise ValueError(f"expected class masks of shape (..., C, H, W), got {masks.shape}")
    classes = masks.shape[-3]
    labels = np.zeros(masks.shape[:-3] + masks.shape[-2:], dtype=np.uint8 if classes <= 255 else np.uint16)
    for c in range(classes):
        labels[masks[..., c, :, :] != 0] = c + 1
    return labels
