"""Check a dataset (a folder of TIFF pairs or an HDF5 patch file) before training on it.

Files are read one at a time (HDF5 in chunks of patches), so memory stays bounded on large datasets.
Errors are problems that would break or silently spoil training; warnings deserve a look.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..terminal import printable_line
from .hdf5_patches import HDF5_SUFFIXES, IMAGE_PATCHES, MASK_PATCHES, import_h5py, labels_from_class_masks, patch_layout
from .pixel_values import ValueBounds, robust_centre_scale, value_problem
from .tiff_pairs import DataError, as_image, as_labels, find_pairs, read_pixel_size_nm, read_tiff

# Bytes of image and mask data read from an HDF5 file at a time.
_CHUNK_BYTES = 64 * 2**20
# Pixels per image (HDF5: per patch) drawn for the data's median and spread, and the most kept in all.
_SAMPLE_PER_IMAGE = 256
_SAMPLE_MAX = 2**22


class _ValueSurvey:
    """The data set's median and spread from a bounded pixel sample, and each image's value range, so that the
    images beyond ``pixel_values.ValueBounds`` are found after one pass over the files."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.samples: list[np.ndarray] = []
        self.sampled = 0
        self.ranges: list[tuple[str, float, float]] = []  # (name, lowest, highest finite value)

    def check(self, report: DatasetReport, name: str, image: np.ndarray, joiner: str = ": ") -> None:
        """Report an image's values on their own (``pixel_values.value_problem``) and extend the report's range;
        record a good image for the outlier check of ``problems``."""
        problem = value_problem(image)
        finite = image[np.isfinite(image)] if np.issubdtype(image.dtype, np.floating) else image
        _extend_range(report, finite)
        if problem:
            report.errors.append(f"{name}{joiner}{problem}")
        else:  # one error per image: an absurd value would also be an outlier
            self.add(name, finite)

    def add(self, name: str, values: np.ndarray) -> None:
        """Record one image's finite values (any shape)."""
        if not values.size:
            return
        self.ranges.append((name, float(values.min()), float(values.max())))
        flat = values.reshape(-1)
        self.samples.append(flat[self.rng.integers(0, flat.size, min(flat.size, _SAMPLE_PER_IMAGE))].astype(float))
        self.sampled += len(self.samples[-1])
        if self.sampled > _SAMPLE_MAX:  # thin out: a random half of every image's sample stays
            self.samples = [sample[self.rng.random(sample.size) < 0.5] for sample in self.samples]
            self.sampled = sum(sample.size for sample in self.samples)

    def problems(self) -> list[str]:
        """``name: problem`` for every image with a pixel beyond the bounds."""
        if not self.samples:
            return []
        try:
            bounds = ValueBounds(*robust_centre_scale(np.concatenate(self.samples)))
        except ValueError:
            return []  # constant data: nothing is an outlier (and training refuses it for its own reason)
        found = ((name, bounds.problem(low, high)) for name, low, high in self.ranges)
        return [f"{name}: {problem}" for name, problem in found if problem]


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found.

    Attributes:
        path: the checked folder or file.
        kind: "TIFF folder" or "HDF5 file".
        num_classes: the class count checked against, if any.
        images_per_split, masks_per_split: counts per split ("train", "val", or "all" when not split);
            a mask counts when it matches an image.
        image_shapes: image shape ((H, W) or (Z, H, W)) -> number of images.
        image_dtypes, mask_dtypes: stored dtype name -> number of files (HDF5: patches).
        pixel_sizes_nm: stored pixel size in nm (``None``: not stored) -> number of images (TIFF only).
        label_pixels: mask label -> number of pixels over all masks (0 is background).
        image_range: smallest and largest finite image value, or ``None`` when no image was readable.
        errors, warnings: one line each, naming the file.
    """

    path: Path
    kind: str
    num_classes: int | None = None
    images_per_split: Counter = field(default_factory=Counter)
    masks_per_split: Counter = field(default_factory=Counter)
    image_shapes: Counter = field(default_factory=Counter)
    image_dtypes: Counter = field(default_factory=Counter)
    mask_dtypes: Counter = field(default_factory=Counter)
    pixel_sizes_nm: Counter = field(default_factory=Counter)
    label_pixels: Counter = field(default_factory=Counter)
    image_range: tuple[float, float] | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(self.images_per_split.values())

    @property
    def num_masks(self) -> int:
        return sum(self.masks_per_split.values())

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def format(self) -> str:
        """A readable summary table followed by the errors and warnings, one per line."""
        splits = list(self.images_per_split)
        width = max([len("split"), *(len(s) for s in splits)])
        lines = [f"Dataset check: {self.path} ({self.kind})", f"  {'split':<{width}}  {'images':>7}  {'masks':>7}"]
        lines += [f"  {s:<{width}}  {self.images_per_split[s]:>7}  {self.masks_per_split[s]:>7}" for s in splits]
        if len(splits) > 1:
            lines.append(f"  {'total':<{width}}  {self.num_images:>7}  {self.num_masks:>7}")

        def tally(counter: Counter, key=str) -> str:
            return ", ".join(f"{key(k)} ({n})" for k, n in counter.most_common()) or "-"

        lines.append(f"  image shapes:  {tally(self.image_shapes, lambda s: 'x'.join(map(str, s)))}")
        lines.append(f"  image dtypes:  {tally(self.image_dtypes)}")
        lines.append(f"  mask dtypes:   {tally(self.mask_dtypes)}")
        if self.pixel_sizes_nm:
            sizes = tally(self.pixel_sizes_nm, _pixel_size_text)
            lines.append(f"  pixel size:    {sizes}")
        if self.image_range is not None:
            lines.append(f"  image values:  {self.image_range[0]:.4g} .. {self.image_range[1]:.4g}")
        total = sum(self.label_pixels.values())
        if total:
            shares = ", ".join(f"{k}: {100 * n / total:.3g} %" for k, n in sorted(self.label_pixels.items()))
            lines.append(f"  mask labels:   {shares} of pixels")
        if self.num_classes is not None:
            lines.append(f"  num_classes:   {self.num_classes}")
        for title, prefix, items in (("error", "ERROR", self.errors), ("warning", "WARNING", self.warnings)):
            if items:
                lines.append(f"{len(items)} {title}{'s' if len(items) > 1 else ''}:")
                lines += [f"  {prefix}: {item}" for item in items]
        lines.append("OK" if self.ok else f"FAILED: {len(self.errors)} error{'s' if len(self.errors) > 1 else ''}")
        return "\n".join(printable_line(line) for line in lines)  # file names may hold escape codes or newlines


def _pixel_size_text(size: float | None) -> str:
    return "not stored" if size is None else f"{size:g} nm"


def check_dataset(path: Path, num_classes: int | None = None) -> DatasetReport:
    """Check a folder of TIFF pairs or an ``.h5``/``.hdf5`` patch file and report what it holds and what is wrong.

    Args:
        path: the dataset folder or HDF5 file.
        num_classes: when given, mask labels above it are errors.

    Returns:
        A :class:`DatasetReport`; problems inside the dataset are reported there, not raised.

    Raises:
        DataError: ``path`` does not exist or is neither a folder nor an HDF5 file.
    """
    path = Path(path)
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if path.is_dir():
        report = DatasetReport(path, "TIFF folder", num_classes)
        _check_tiff_folder(path, report)
    elif path.is_file() and path.suffix.lower() in HDF5_SUFFIXES:
        report = DatasetReport(path, "HDF5 file", num_classes)
        _check_hdf5(path, report)
    elif not path.exists():
        raise DataError(path, "not found")
    else:
        raise DataError(path, "expected a folder of TIFF pairs or an .h5/.hdf5 patch file")
    return report


def _extend_range(report: DatasetReport, values: np.ndarray) -> None:
    if values.size:
        low, high = float(values.min()), float(values.max())
        if report.image_range is not None:
            low, high = min(low, report.image_range[0]), max(high, report.image_range[1])
        report.image_range = (low, high)


def _label_counts(labels: np.ndarray) -> Counter:
    """Label -> pixel count; bincount is much faster than unique for the usual small label values."""
    if labels.size and labels.max() < 2**16:
        counts = np.bincount(labels.ravel().astype(np.intp, copy=False))
        return Counter({int(v): int(counts[v]) for v in np.flatnonzero(counts)})
    values, counts = np.unique(labels, return_counts=True)
    return Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))


class _TiffFolderCheck:
    """Checks the pairs of one TIFF folder, one file at a time, and fills a report."""

    def __init__(self, root: Path, report: DatasetReport):
        self.root = root
        self.report = report
        self.examples: dict[tuple[str, object], Path] = {}  # first file seen with each dtype or plane count
        self.values = _ValueSurvey()

    def name(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def problem(self, error: DataError) -> str:
        return f"{self.name(error.path)}: {error.problem}"

    def image(self, path: Path) -> tuple[int, int] | None:
        """Check one image; return its (H, W), or None when unreadable."""
        report = self.report
        try:
            raw = read_tiff(path)
            image = as_image(raw, path)
            pixel_size = read_pixel_size_nm(path)
        except DataError as error:
            report.errors.append(self.problem(error))
            return None
        report.image_dtypes[raw.dtype.name] += 1
        report.image_shapes[image.shape] += 1
        pixel_size = None if pixel_size is None else round(pixel_size, 6)  # rational tags are not exact
        report.pixel_sizes_nm[pixel_size] += 1
        self.examples.setdefault(("image dtype", raw.dtype.name), path)
        self.examples.setdefault(("pixel size", pixel_size), path)
        self.examples.setdefault(("planes", 1 if image.ndim == 2 else image.shape[0]), path)
        # Check the stored values: a float64 value too large for float32 is finite on disk.
        self.values.check(report, self.name(path), raw)
        return image.shape[-2], image.shape[-1]

    def mask(self, path: Path, image_path: Path, image_size: tuple[int, int] | None) -> None:
        report = self.report
        try:
            raw = read_tiff(path)
            labels = as_labels(raw, path)
        except DataError as error:
            report.errors.append(self.problem(error))
            return
        report.mask_dtypes[raw.dtype.name] += 1
        self.examples.setdefault(("mask dtype", raw.dtype.name), path)
        if image_size is not None and labels.shape != image_size:
            report.errors.append(
                f"{self.name(path)}: mask is {labels.shape[0]}x{labels.shape[1]} pixels but its image "
                f"{self.name(image_path)} is {image_size[0]}x{image_size[1]}; they must be the same size"
            )
        counts = _label_counts(labels)
        report.label_pixels.update(counts)
        if not set(counts) - {0}:
            report.warnings.append(f"{self.name(path)}: empty mask (all background)")
        above = sorted(v for v in counts if report.num_classes is not None and v > report.num_classes)
        if above:
            report.errors.append(
                f"{self.name(path)}: labels {', '.join(map(str, above))} above num_classes={report.num_classes}"
            )

    def mixes(self) -> None:
        """Dataset-wide problems: mixed dtypes, plane counts and pixel sizes."""
        report = self.report
        for what, counter in (("image dtype", report.image_dtypes), ("mask dtype", report.mask_dtypes)):
            if len(counter) > 1:
                report.warnings.append(f"{what}s differ: {self._examples(what, counter)}")
        planes = Counter(1 if len(shape) == 2 else shape[0] for shape in report.image_shapes.elements())
        if len(planes) > 1:
            report.errors.append(
                f"images have different numbers of planes (Z): {self._examples('planes', planes)}; "
                "a model takes a fixed number of image channels"
            )
        if len(report.pixel_sizes_nm) > 1:
            sizes = self._examples("pixel size", report.pixel_sizes_nm, _pixel_size_text)
            report.warnings.append(f"images have different pixel sizes: {sizes}")

    def _examples(self, what: str, counter: Counter, text=str) -> str:
        return ", ".join(
            f"{text(key)} ({n} file{'s' if n > 1 else ''}, e.g. {self.name(self.examples[what, key])})"
            for key, n in counter.most_common()
        )


def _check_tiff_folder(root: Path, report: DatasetReport) -> None:
    check = _TiffFolderCheck(root, report)
    try:
        listing = find_pairs(root)
    except DataError as error:
        report.errors.append(check.problem(error))
        return
    for pair in listing.pairs:
        split = pair.split or "all"
        report.images_per_split[split] += 1
        report.masks_per_split[split] += 0  # every split gets a row, even without masks
        size = check.image(pair.image)
        if pair.mask is None:
            report.warnings.append(f"{check.name(pair.image)}: no mask found")
            continue
        report.masks_per_split[split] += 1
        check.mask(pair.mask, pair.image, size)
    report.warnings += [f"{check.name(mask)}: mask without an image" for mask in listing.unmatched_masks]
    report.errors += check.values.problems()
    check.mixes()
    if report.num_masks == 0:
        report.errors.append(f"{root}: no image has a mask")


def _check_hdf5(path: Path, report: DatasetReport) -> None:
    h5py = import_h5py()
    name = path.name
    try:
        h5file = h5py.File(path, "r")
    except OSError as exc:
        report.errors.append(f"{name}: not a readable HDF5 file ({exc})")
        return
    with h5file:
        try:
            layout = patch_layout(h5file, path)
        except DataError as error:
            report.errors.append(f"{name}: {error.problem}")
            return
        images, masks = h5file[IMAGE_PATCHES], h5file[MASK_PATCHES]
        report.images_per_split["all"] = report.masks_per_split["all"] = layout.count
        report.image_shapes[(layout.planes, layout.height, layout.width)] = layout.count
        report.image_dtypes[images.dtype.name] = report.mask_dtypes[masks.dtype.name] = layout.count
        patch_bytes = (layout.planes * images.dtype.itemsize + layout.classes * masks.dtype.itemsize) * (
            layout.height * layout.width
        )
        step = max(1, _CHUNK_BYTES // max(1, patch_bytes))
        non_binary: list[int] = []
        overlapping: list[int] = []
        values = _ValueSurvey()
        for start in range(0, layout.count, step):
            stop = min(start + step, layout.count)
            try:
                image_chunk, mask_chunk = images[start:stop], masks[start:stop]
            except OSError as exc:
                report.errors.append(f"{name}: patches {start}..{stop - 1} are unreadable ({exc})")
                continue
            _check_patch_chunk(name, start, image_chunk, mask_chunk, report, non_binary, overlapping, values)
    report.errors += values.problems()
    if non_binary:
        report.warnings.append(
            f"{name}: {MASK_PATCHES} holds values other than 0 and 1 in {len(non_binary)} patches "
            f"(first: {non_binary[0]}); any nonzero value counts as the class"
        )
    if overlapping:
        report.warnings.append(
            f"{name}: class masks overlap in {len(overlapping)} patches (first: {overlapping[0]}); "
            "the higher class wins"
        )
    above = sorted(v for v in report.label_pixels if report.num_classes is not None and v > report.num_classes)
    if above:
        report.errors.append(
            f"{name}: {MASK_PATCHES} has pixels of classes {', '.join(map(str, above))} "
            f"above num_classes={report.num_classes}"
        )


def _check_patch_chunk(
    name: str,
    start: int,
    images: np.ndarray,
    masks: np.ndarray,
    report: DatasetReport,
    non_binary: list[int],
    overlapping: list[int],
    values: _ValueSurvey,
) -> None:
    """Check patches ``start .. start + len(images) - 1`` of an HDF5 file."""
    n = len(images)
    for i, image in enumerate(images):
        values.check(report, f"{name}: {IMAGE_PATCHES}[{start + i}]", image, joiner=" has ")
    present = masks != 0
    non_binary += (start + np.flatnonzero(((masks != 1) & present).reshape(n, -1).any(1))).tolist()
    overlapping += (start + np.flatnonzero((present.sum(1) > 1).reshape(n, -1).any(1))).tolist()
    labels = labels_from_class_masks(masks)
    report.label_pixels.update(_label_counts(labels))
    for i in np.flatnonzero(~labels.reshape(n, -1).any(1)):
        report.warnings.append(f"{name}: {MASK_PATCHES}[{start + i}] is empty (all background)")
