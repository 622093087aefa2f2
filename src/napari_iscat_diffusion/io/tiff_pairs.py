"""Folders of TIFF image/mask pairs: find the pairs, read images and label masks, write TIFFs atomically.

Layouts found by :func:`find_pairs` (``.tif`` or ``.tiff``, inside ``train/`` and ``val/`` when those exist):

- ``images/NAME.tif`` with ``masks/NAME.tif``, ``masks/NAME_mask.tif`` or ``masks/NAME_gt.tif``;
- a flat folder with ``NAME.tif`` and ``NAME_mask.tif`` or ``NAME_gt.tif``.

Pixel sizes are stored the way ImageJ stores them: XResolution/YResolution in pixels per micrometre,
ResolutionUnit NONE and ``unit=um`` in the ImageJ description.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from .atomic import atomic_open

TIFF_SUFFIXES = (".tif", ".tiff")
# The most pixel data one TIFF may hold: the 4 GiB of a classic TIFF, which is what ``write_tiff`` writes. A header
# that claims more (a file of a few bytes can claim 100000 x 100000 pixels) is refused before memory is spent.
MAX_TIFF_BYTES = 4 << 30
MASK_SUFFIXES = ("_mask", "_gt")
SPLITS = ("train", "val")

# Length units that ImageJ writes into its description, in nanometres.
_UNIT_NM = {
    "nm": 1.0,
    "nanometer": 1.0,
    "um": 1e3,
    "µm": 1e3,  # micro sign
    "μm": 1e3,  # Greek mu
    "\\u00b5m": 1e3,  # ImageJ escapes non-ASCII characters
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "mm": 1e6,
    "cm": 1e7,
    "m": 1e9,
    "inch": 2.54e7,
}
# ResolutionUnit tag values with a physical unit, in nanometres. INCH is left out on purpose: it is the
# TIFF default and most writers fill in a meaningless 72 dpi.
_RESUNIT_NM = {
    tifffile.RESUNIT.CENTIMETER: 1e7,
    tifffile.RESUNIT.MILLIMETER: 1e6,
    tifffile.RESUNIT.MICROMETER: 1e3,
}


# Floats hold every whole number up to 2**53 exactly; larger values are not labels that a float mask can carry.
_MAX_FLOAT_LABEL = 2.0**53


class DataError(ValueError):
    """A data file is missing, unreadable or not what the pipeline expects.

    ``str(error)`` is ``"<path>: <problem>"``; ``path`` and ``problem`` are also attributes.
    """

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):  # keep it picklable (DataLoader workers send exceptions between processes)
        return type(self), (self.path, self.problem)


@dataclass(frozen=True)
class ImageMaskPair:
    """One image with its mask (``None`` when it has none) and its split ("train", "val" or ``None``)."""

    name: str
    image: Path
    mask: Path | None
    split: str | None


@dataclass(frozen=True)
class PairListing:
    """The pairs of a folder, sorted by split then name, and the masks that match no image."""

    pairs: list[ImageMaskPair]
    unmatched_masks: list[Path]


def _tiffs(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for the TIFF files directly in ``folder``, sorted by stem."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Hidden files include macOS "._NAME.tif" resource forks, which are not images.
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in TIFF_SUFFIXES:
            continue
        if path.stem in found:
            raise DataError(path, f"same name as {found[path.stem].name}; keep only one of them")
        found[path.stem] = path
    return dict(sorted(found.items()))


def _pairs_in(folder: Path, split: str | None) -> tuple[list[ImageMaskPair], list[Path]]:
    if (folder / "images").is_dir():
        images = _tiffs(folder / "images")
        masks = _tiffs(folder / "masks") if (folder / "masks").is_dir() else {}
        suffixes: tuple[str, ...] = ("", *MASK_SUFFIXES)
    else:
        files = _tiffs(folder)
        masks = {stem: path for stem, path in files.items() if stem.endswith(MASK_SUFFIXES)}
        images = {stem: path for stem, path in files.items() if stem not in masks}
        suffixes = MASK_SUFFIXES
    pairs = []
    used: set[str] = set()
    for name, image in images.items():
        matches = [name + suffix for suffix in suffixes if name + suffix in masks]
        if len(matches) > 1:
            names = " and ".join(masks[m].name for m in matches)
            raise DataError(image, f"ambiguous masks: {names} both match; keep only one")
        used.update(matches)
        pairs.append(ImageMaskPair(name, image, masks[matches[0]] if matches else None, split))
    return pairs, [path for stem, path in masks.items() if stem not in used]


def find_pairs(root: Path) -> PairListing:
    """List the image/mask pairs under ``root`` (see the module docstring for the layouts).

    When ``root`` holds a ``train/`` or ``val/`` folder, only those are read, each with its own layout.
    Raises :class:`DataError` when ``root`` is not a folder, holds no TIFF image, or an image matches
    two masks.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "folder not found" if not root.exists() else "expected a folder of TIFF files")
    folders = [(split, root / split) for split in SPLITS if (root / split).is_dir()] or [(None, root)]
    pairs: list[ImageMaskPair] = []
    unmatched: list[Path] = []
    for split, folder in folders:
        found, extra = _pairs_in(folder, split)
        pairs += found
        unmatched += extra
    if not pairs:
        raise DataError(
            root,
            "no TIFF images found; expected images/NAME.tif with masks/NAME.tif (or NAME_mask.tif, NAME_gt.tif), "
            "or NAME.tif next to NAME_mask.tif or NAME_gt.tif, optionally inside train/ and val/",
        )
    return PairListing(pairs, unmatched)


def read_tiff(path: Path) -> np.ndarray:
    """Read the one image or stack of a single-channel TIFF file as stored (dtype unchanged).

    Leading axes of length 1 are dropped, so the last two axes are always (H, W). Raises :class:`DataError` for a
    missing file, a folder or other non-regular file, an unreadable file, and for a file that is not one
    single-channel image or stack (see ``_check_layout``).
    """
    path = Path(path)
    with _checked_tiff(path) as tif:
        data = tif.series[0].asarray()
    if data.ndim < 2:
        raise DataError(path, f"expected an image, got an array of shape {data.shape}")
    return data.reshape(_without_leading_ones(data.shape))


def tiff_shape(path: Path) -> tuple[int, ...]:
    """The shape of the array that :func:`read_tiff` returns, from the file's header alone (no pixel is read), so
    that a size can be refused before a small compressed file expands to gigabytes. Raises as ``read_tiff`` does."""
    with _checked_tiff(Path(path)) as tif:
        return _without_leading_ones(tif.series[0].shape)


def _without_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*(n for n in shape[:-2] if n != 1), *shape[-2:])


@contextlib.contextmanager
def _checked_tiff(path: Path) -> Iterator[tifffile.TiffFile]:
    """The open TIFF ``path`` once it is known to be a regular file of one single-channel image or stack
    (``_check_layout``); DataError for anything else, also for what goes wrong reading it in the ``with`` block."""
    _check_regular_file(path)
    try:
        with tifffile.TiffFile(path) as tif:
            _check_layout(tif, path)
            yield tif
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # tifffile raises many exception types on damaged files
        raise DataError(path, f"not a readable TIFF file ({type(exc).__name__}: {exc})") from exc


def _check_regular_file(path: Path) -> None:
    """DataError unless ``path`` is a regular file (a FIFO would block the reader, a device never end)."""
    if path.is_dir():
        raise DataError(path, "is a folder; expected a TIFF file")
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "is not a regular file; expected a TIFF file")


def _check_layout(tif: tifffile.TiffFile, path: Path) -> None:
    """DataError unless the TIFF holds exactly one series of one sample per pixel and at most ``MAX_TIFF_BYTES``.

    Checked from the header, before any pixel is read: several series (pages of different sizes or types) would
    be read as their first only, and colour samples as separate images or labels.
    """
    if len(tif.series) != 1:
        raise DataError(
            path,
            f"holds {len(tif.series)} image series (pages of different sizes or types); save one image or one "
            "stack of equal pages per file",
        )
    series = tif.series[0]
    if "S" in series.axes:
        samples = series.shape[series.axes.index("S")]
        kind = {3: "an RGB", 4: "an RGBA"}.get(samples, "a multi-channel")
        raise DataError(
            path,
            f"is {kind} image ({samples} samples per pixel); save it as a single-channel (grayscale or label) image",
        )
    size = math.prod(series.shape) * series.dtype.itemsize
    if size > MAX_TIFF_BYTES:
        raise DataError(
            path,
            f"claims {' x '.join(map(str, series.shape))} {series.dtype} pixels ({size / 2**30:.1f} GiB), more than "
            f"the {MAX_TIFF_BYTES >> 30} GiB one TIFF file holds",
        )


def as_image(array: np.ndarray, source: Path | str) -> np.ndarray:
    """Check an image array and return it as float32 (H, W) or (Z, H, W); ``source`` names it in errors.

    Values are kept as they are (no rescaling): absolute contrast carries the particle mass.
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise DataError(source, f"expected a 2-D image (H, W) or a stack (Z, H, W), got shape {array.shape}")
    if array.dtype != bool and not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(source, f"unsupported image dtype {array.dtype}; expected integers or floats")
    return array.astype(np.float32, copy=False)


def as_labels(array: np.ndarray, source: Path | str, *, allow_stack: bool = False) -> np.ndarray:
    """Check a label mask and return it as an integer array (0 background, 1..K classes): (H, W), or
    (N, H, W) when ``allow_stack`` is true.

    Booleans become uint8; floats are accepted when every value is a whole number from 0 to 2**53 and become the
    smallest unsigned integer dtype that holds them. ``source`` names the mask in errors.
    """
    array = np.asarray(array)
    if array.ndim != 2 and not (allow_stack and array.ndim == 3):
        expected = "a 2-D label image (H, W) or a stack (N, H, W)" if allow_stack else "a 2-D label image (H, W)"
        raise DataError(
            source,
            f"expected {expected}, got shape {array.shape}; "
            "RGB or multi-channel files are not label masks (save one channel with integer labels)",
        )
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() < 0:
            raise DataError(source, f"negative label {array.min()}; expected 0 (background) or class labels 1..K")
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(source, f"unsupported mask dtype {array.dtype}; expected integer labels")
    if (
        not np.all(np.isfinite(array))
        or np.any(array != np.round(array))
        or (array.size and (array.min() < 0 or array.max() > _MAX_FLOAT_LABEL))
    ):
        raise DataError(
            source, f"{array.dtype} mask with values that are not labels; expected integers 0 (background), 1..K"
        )
    return array.astype(np.min_scalar_type(int(array.max()) if array.size else 0))


def read_image(path: Path) -> np.ndarray:
    """Read a single-channel TIFF image as float32 (H, W), or (Z, H, W) for a stack. Raises :class:`DataError`, also
    for an RGB file (``read_tiff``)."""
    return as_image(read_tiff(path), path)


def read_mask(path: Path, *, allow_stack: bool = False) -> np.ndarray:
    """Read a TIFF label mask as an integer array (H, W), or (N, H, W) with ``allow_stack`` (see
    :func:`as_labels`). Raises :class:`DataError`, also for an RGB or multi-series file (``read_tiff``)."""
    return as_labels(read_tiff(path), path, allow_stack=allow_stack)


def _storable(array: np.ndarray, path: Path) -> np.ndarray:
    """Convert to a dtype that ImageJ reads: uint8 or uint16 for labels and counts, float32 otherwise."""
    if array.dtype == bool:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and (array.size == 0 or (array.min() >= 0 and array.max() <= 65535)):
        return array.astype(np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16, copy=False)
    if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise ValueError(f"{path}: cannot store dtype {array.dtype} in a TIFF file; expected integers or floats")


def write_tiff(
    path: Path,
    array: np.ndarray,
    *,
    pixel_size_nm: float | None = None,
    info: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write a 2-D (H, W) or 3-D (Z, H, W) array as an ImageJ-compatible TIFF, atomically.

    The data go to a temporary file in the same folder which then replaces ``path`` in one step, so
    ``path`` never holds a half-written file. Booleans and integers in 0..65535 are stored as uint8/uint16,
    other numbers as float32. ``pixel_size_nm`` (nanometres per pixel) is stored as the TIFF resolution
    and ImageJ unit, read back by :func:`read_pixel_size_nm`. ``info`` is stored as ImageJ's "Info" property
    (Image > Show Info in ImageJ), read back by :func:`read_tiff_info`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        FileNotFoundError: the folder of ``path`` does not exist.
        ValueError: unsupported shape, dtype or pixel size.
    """
    path = Path(path)
    array = _storable(np.asarray(array), path)
    if array.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D (H, W) or 3-D (Z, H, W) array, got shape {array.shape}")
    if pixel_size_nm is not None and not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"{path}: pixel_size_nm must be a positive number, got {pixel_size_nm!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")

    metadata: dict[str, str] = {"axes": "ZYX" if array.ndim == 3 else "YX"}
    options: dict = {}
    if pixel_size_nm is not None:
        pixels_per_um = 1000.0 / pixel_size_nm
        metadata["unit"] = "um"
        options = {"resolution": (pixels_per_um, pixels_per_um), "resolutionunit": tifffile.RESUNIT.NONE}
    if info is not None:
        metadata["Info"] = info
    with atomic_open(path, "wb") as handle:
        tifffile.imwrite(handle, array, imagej=True, metadata=metadata, **options)


def read_tiff_info(path: Path) -> str | None:
    """Return the ImageJ "Info" property that :func:`write_tiff` stores, or ``None`` when the file has none.

    Raises :class:`DataError` for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            info = (tif.imagej_metadata or {}).get("Info")
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many exception types on damaged files
        raise DataError(path, f"not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    return None if info is None else str(info)


def read_pixel_size_nm(path: Path) -> float | None:
    """Return the pixel size in nanometres stored in a TIFF file, or ``None`` when it holds none.

    Reads the ImageJ unit when present, else a physical ResolutionUnit (cm, mm, µm). Raises :class:`DataError`
    for a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            resolution = tags.valueof(282)  # XResolution as (numerator, denominator)
            resolution_unit = tags.valueof(296, default=tifffile.RESUNIT.INCH)
            imagej_unit = (tif.imagej_metadata or {}).get("unit")
    except MemoryError:
        raise
    except Exception as exc:  # tifffile raises many exception types on damaged files
        raise DataError(path, f"not a readable TIFF file ({type(exc).__name__}: {exc})") from exc
    if resolution is None or resolution[0] == 0 or resolution[1] == 0:
        return None
    pixels_per_unit = resolution[0] / resolution[1]
    if imagej_unit is not None:
        nm_per_unit = _UNIT_NM.get(str(imagej_unit).strip().lower())
    else:
        nm_per_unit = _RESUNIT_NM.get(resolution_unit)
    return None if nm_per_unit is None else nm_per_unit / pixels_per_unit
