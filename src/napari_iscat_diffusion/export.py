"""Batch export of synthetic pairs: masks in; ``images/NAME.tif``, ``masks/NAME.tif`` and ``manifest.csv`` out.

Pure numpy and the diffusion core (no napari or Qt), so the Batch export widget and the command line
drive the same code. Each TIFF is written atomically (``write_tiff``) and carries its pair's provenance as
JSON in ImageJ's "Info" property; a pair counts as finished when both files exist and a manifest holds its
row, which is appended (and synced) after the files. An interrupted export therefore resumes by skipping
finished pairs and recording pairs whose files were written but not recorded (their stored provenance says
that they are this pair); nothing is ever overwritten.

Masks are made or read one at a time (:class:`MaskSequence`), so an export holds one mask and one batch of
images whatever the number of pairs. A lock file in the folder keeps a second export out while one writes.

Several processes (``torchrun``) share one export: pair ``i`` belongs to rank ``i % world_size``, and each
rank appends to its own ``manifest.rank{r}.csv``, so no two processes write one file. After all ranks have
finished, one process calls :func:`merge_manifests` to fold them into ``manifest.csv``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import heapq
import io
import json
import os
import re
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from .diffusion import GenerationProgress, LoadedModel, SamplingCancelled, check_mask, generate
from .diffusion.generate import LARGEST_SEED
from .io.atomic import atomic_open
from .io.output_paths import check_output_folder
from .io.tiff_pairs import TIFF_SUFFIXES, read_image, read_mask, read_tiff_info, write_tiff
from .iscat.masks import random_mask
from .png import grid, to_uint8, write_png
from .synthetic import SamplerSettings, contrast_limits, provenance

MANIFEST = "manifest.csv"
_RANK_MANIFEST = "manifest.rank{}.csv"
MANIFEST_FIELDS = (
    "name",
    "pair",
    "image",
    "mask",
    "sample",
    "seed",
    "source_mask",
    "checkpoint",
    "checkpoint_sha256",
    "sampler",
    "steps",
    "guidance",
    "class_guidance",
    "guidance_interval",
    "precision",
    "package_version",
)
# A folder holds one export: rows must agree on these, so that a resumed run cannot mix settings.
_SETTINGS_FIELDS = ("checkpoint_sha256", "sampler", "steps", "guidance", "class_guidance", "guidance_interval")
# Fields that may be empty in a complete row ("" class guidance: one scale everywhere) or missing in a manifest
# written before they existed.
_OPTIONAL_FIELDS = ("checkpoint", "class_guidance", "guidance_interval")
# What a manifest without a settings column was made with (a missing class guidance reads "" already).
_BEFORE_COLUMN = {"guidance_interval": "all"}
# Cells written from numbers; every other cell is text and is neutralised against formula injection.
_INTEGER_FIELDS = ("pair", "sample", "seed", "steps")
_NUMBER_FIELDS = (*_INTEGER_FIELDS, "guidance")
# Spreadsheets run a cell starting with one of these as a formula; a leading "'" makes it text. Cells that start
# with "'" themselves get one too, so that reading strips exactly one and gives back what was written.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# What an image's stored provenance must match for a file without a manifest row to count as this pair.
_IDENTITY_FIELDS = ("name", "pair", "seed", "mask_sha256", *_SETTINGS_FIELDS)
# The names atomic_open gives its temporary files (".NAME.RANDOM.tmp", the random part hex digits and dashes) for
# the files an export writes.
_TIFF_TEMPORARY = r"\..+\.tif\.[0-9a-f-]+\.tmp"
_MANIFEST_TEMPORARY = r"\.manifest(\.rank\d+)?\.csv\.[0-9a-f-]+\.tmp"
_LOCK = ".export.lock"
_RANK_LOCK = ".export.rank{}.lock"
# Room for "_sNNN.tif" and atomic_open's ".NAME.XXXXXXXXXXXX.tmp" within the 255 bytes most file systems allow.
_MAX_NAME_BYTES = 200
# File names that Windows reserves for devices, whatever follows the first dot.
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))]
)


class ExportError(ValueError):
    """The export cannot go on (a folder with another export in it, a stray file); the message says what to do."""


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


@dataclass(frozen=True)
class ExportProgress:
    """Reported after every sampler step: pairs finished (written or skipped) of the total, and the step."""

    pairs_done: int
    pairs_total: int
    current: str
    step: int
    steps: int


@dataclass(frozen=True)
class ExportSummary:
    """What an export (or one rank of it) did: pairs written, pairs skipped as finished (files already there,
    with or without their manifest row), whether it was cancelled."""

    folder: Path
    written: int
    skipped: int
    cancelled: bool


def _safe_name(name: str) -> str:
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
        stem = _safe_name(name)
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
    names = [_safe_name(p.stem) for p in paths]
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


def _as_mask_sequence(masks: Sequence[MaskItem]) -> MaskSequence:
    """``masks`` as a :class:`MaskSequence` (a list of items, e.g. from :func:`masks_from_arrays`, is wrapped)."""
    if isinstance(masks, MaskSequence):
        return masks
    return MaskSequence(len(masks), lambda i: masks[i].name, lambda i: masks[i].source, lambda i: masks[i].mask)


def _is_regular_file(path: Path) -> bool:
    """True for a regular file, False when nothing is there; ExportError for a link, a folder or anything else,
    which an export never writes through, replaces or adopts."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return True
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
    raise ExportError(
        f"{path} is {kind}; an export only writes and reads its own files: remove it or choose another folder"
    )


def _open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (O_NOFOLLOW where the system has it)."""
    _is_regular_file(path)
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


@contextlib.contextmanager
def _file_errors(path: Path) -> Iterator[None]:
    """Turn an OSError (disk full, no permission, a name too long) into a one-line ExportError naming ``path``."""
    try:
        yield
    except OSError as error:
        where = error.filename or path
        raise ExportError(
            f"{where}: {error.strerror or error}; nothing half-written is left, fix this and export again to resume"
        ) from error


@contextlib.contextmanager
def _flock(path: Path, folder: Path, *, shared: bool) -> Iterator[None]:
    """Hold a non-blocking ``flock`` on ``path`` (shared or exclusive); ExportError when another process holds it."""
    import fcntl

    descriptor = _open_no_follow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export is writing to {folder}; wait for it or choose another folder") from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


@contextlib.contextmanager
def _export_lock(folder: Path, rank: int, world_size: int) -> Iterator[None]:
    """Keep other exports out of ``folder`` while this one writes: one process holds the folder's lock alone; the
    ranks of a torchrun job share it and each holds its own rank's lock alone. (POSIX only: Windows has no
    ``flock``, and there the lock is not taken.)"""
    if os.name != "posix":
        yield
        return
    with contextlib.ExitStack() as locks:
        locks.enter_context(_flock(folder / _LOCK, folder, shared=world_size > 1))
        if world_size > 1:
            locks.enter_context(_flock(folder / _RANK_LOCK.format(rank), folder, shared=False))
        yield


def _neutralised(value: object, field: str) -> str:
    """A cell as written: text starting with a formula character gets a leading "'" (numbers are written as is);
    characters UTF-8 cannot hold (undecodable bytes of a file name) are written as backslash escapes."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    return "'" + text if field not in _NUMBER_FIELDS and text.startswith(_FORMULA_STARTS) else text


def _restored(text: str, field: str) -> str:
    """A cell as read: the "'" that :func:`_neutralised` added is taken off again."""
    return text[1:] if field not in _NUMBER_FIELDS and text.startswith("'") else text


def _ends_with_newline(path: Path) -> bool:
    """True when the file's last byte is a newline (a row is written with its line end in one append)."""
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _check_header(header: list[str], manifest: Path) -> None:
    """ExportError for a manifest this package did not write: unknown or repeated columns, or required ones missing."""
    required = [field for field in MANIFEST_FIELDS if field not in _OPTIONAL_FIELDS]
    if len(set(header)) != len(header) or not set(required) <= set(header) <= set(MANIFEST_FIELDS):
        raise ExportError(
            f"{manifest} is not a manifest of iscat-diffusion export (its columns are {', '.join(header)[:200]}); "
            "move it away or choose another output folder"
        )


def _complete(row: dict) -> bool:
    """True for a row with every required field, numbers where numbers belong, and the file names of its pair
    (a row naming other files, e.g. ``../x.tif``, is not one of ours)."""
    if any(row.get(field) in (None, "") for field in MANIFEST_FIELDS if field not in _OPTIONAL_FIELDS):
        return False
    name = row["name"]
    if re.search(r"[/\\]|^\.", name) or (row["image"], row["mask"]) != (f"images/{name}.tif", f"masks/{name}.tif"):
        return False
    try:
        [int(row[field]) for field in _INTEGER_FIELDS]
        float(row["guidance"])
    except ValueError:
        return False
    return True


def _read_manifest(manifest: Path) -> Iterator[dict | None]:
    """The rows of one manifest in file order, cells restored; None for a row cut short by a crash or damaged.

    Raises ExportError for a symbolic link or a file that is not one of our manifests.
    """
    with _file_errors(manifest), open(_open_no_follow(manifest, os.O_RDONLY), newline="", encoding="utf-8") as file:
        reader = csv.reader(file, strict=True)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError):
            header = ["(unreadable)"]
        if header is None:
            return
        _check_header(header, manifest)
        cut_short = not _ends_with_newline(manifest)  # the last row was being appended when the writer died
        previous: list[str] | None = None
        try:
            for record in reader:
                if previous is not None:
                    yield _row(previous, header)
                previous = record
        except (csv.Error, UnicodeDecodeError):
            cut_short = True  # an open quote at the end, or bytes cut inside a character
        if previous is not None:
            yield None if cut_short else _row(previous, header)


def _row(record: list[str], header: list[str]) -> dict | None:
    """A record as a dict with its cells restored, or None when it does not have one cell per column or is
    incomplete."""
    if len(record) != len(header):
        return None
    row = {field: _restored(text, field) for field, text in zip(header, record, strict=True)}
    return row if _complete(row) else None


def _manifest_files(folder: Path) -> list[Path]:
    """``manifest.csv`` and the per-rank manifests of an unmerged multi-process export, those that exist."""
    candidates = [folder / MANIFEST, *sorted(folder.glob(_RANK_MANIFEST.format("*")))]
    return [path for path in candidates if _is_regular_file(path)]


def _complete_rows(folder: Path) -> Iterator[dict]:
    """The complete rows of every manifest of ``folder``, one at a time."""
    for manifest in _manifest_files(Path(folder)):
        yield from (row for row in _read_manifest(manifest) if row is not None)


def count_pairs(folder: Path) -> int:
    """The number of pairs that the manifests of an export folder list (each pair once), read a row at a time."""
    return len({row["name"] for row in _complete_rows(folder)})


def finished_pairs(folder: Path) -> dict[str, dict]:
    """The complete manifest rows of an export folder by pair name, from ``manifest.csv`` and any rank manifests.

    A row cut short by a crash is ignored; a pair listed twice (a merge interrupted before it removed the rank
    files) counts once. Raises ExportError for a manifest that is a link or not ours.
    """
    return {row["name"]: row for row in _complete_rows(folder)}


def _write_manifest(manifest: Path, rows: Iterator[dict] | Sequence[dict]) -> None:
    """Replace ``manifest`` atomically with ``rows`` (cells neutralised)."""
    with _file_errors(manifest), atomic_open(manifest, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows([_neutralised(row.get(field, ""), field) for field in MANIFEST_FIELDS] for row in rows)


def _merge(folder: Path) -> Path:
    """:func:`merge_manifests` without taking the folder's lock (the caller holds it)."""
    manifest = folder / MANIFEST
    ranks = [path for path in _manifest_files(folder) if path != manifest]
    if not ranks:
        return manifest
    _write_manifest(manifest, sorted(finished_pairs(folder).values(), key=lambda row: int(row["pair"])))
    for path in ranks:
        path.unlink()
    return manifest


def merge_manifests(folder: Path) -> Path:
    """Fold the per-rank manifests into ``manifest.csv`` (rows in pair order) and remove them; returns its path.

    Run it once, in one process, after every rank has finished. ``manifest.csv`` is replaced atomically and
    the rank files are removed only afterwards, so an interruption loses no row.
    """
    folder = Path(folder)
    with _export_lock(folder, 0, 1):
        return _merge(folder)


def _remove_leftover_temporaries(folder: Path) -> None:
    """Remove the temporary files of ``atomic_open`` that a killed export left (``.NAME.XXXXXXXXXXXX.tmp`` beside
    its pair files and manifests). Call it only with the folder's exclusive lock held: no other export writes."""
    for place, pattern in (
        (folder, _MANIFEST_TEMPORARY),
        (folder / "images", _TIFF_TEMPORARY),
        (folder / "masks", _TIFF_TEMPORARY),
    ):
        for path in place.iterdir():
            if re.fullmatch(pattern, path.name) and _is_regular_file(path):
                path.unlink()


def _drop_incomplete_rows(manifest: Path) -> None:
    """Rewrite this process's own manifest without the rows a crash cut short, so that none stays beside the new
    row of its pair (atomically: a crash now leaves the old file)."""
    if _is_regular_file(manifest) and any(row is None for row in _read_manifest(manifest)):
        _write_manifest(manifest, (row for row in _read_manifest(manifest) if row is not None))


def _check_same_settings(folder: Path, row: dict, expected: dict, first_seed: int) -> None:
    different = [f for f in _SETTINGS_FIELDS if str(row.get(f) or _BEFORE_COLUMN.get(f, "")) != str(expected[f])]
    if int(row["seed"]) - int(row["pair"]) != first_seed:
        different.append("seed")
    if different:
        raise ExportError(
            f"{folder} already holds an export made with other settings ({', '.join(different)} differ, "
            f"for example pair {row['name']!r}); choose a new output folder or the same model and settings"
        )


def _append_row(manifest: Path, row: dict) -> None:
    """Append one row (cells neutralised) and sync it, writing the header first for a new file."""
    with _file_errors(manifest):
        new = not _is_regular_file(manifest) or manifest.stat().st_size == 0
        text = io.StringIO()
        writer = csv.writer(text)
        if new:
            writer.writerow(MANIFEST_FIELDS)
        writer.writerow([_neutralised(row.get(field, ""), field) for field in MANIFEST_FIELDS])
        data = text.getvalue().encode("utf-8")
        descriptor = _open_no_follow(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            while data:  # one write call in practice: the row goes on at once or not at all
                data = data[os.write(descriptor, data) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _mask_sha256(mask: np.ndarray) -> str:
    """A digest of a mask's shape and labels, whatever its integer dtype."""
    labels = np.ascontiguousarray(mask, dtype=np.int64)
    return hashlib.sha256(repr(labels.shape).encode() + labels.tobytes()).hexdigest()


def _stored_provenance(path: Path) -> dict | None:
    """The provenance an export stored in a TIFF, or None when it holds none (or is not a readable TIFF)."""
    try:
        info = read_tiff_info(path)
        stored = json.loads(info) if info else None
    except ValueError:  # DataError for a damaged file, JSONDecodeError for foreign text
        return None
    return stored if isinstance(stored, dict) else None


def _recordable_provenance(folder: Path, item: MaskItem, expected: dict) -> dict | None:
    """The row to record for the pair's files, there without a manifest row (a run killed between writing and
    recording): the provenance stored in its image when it matches this pair, None when there is no image.
    ExportError when a file is not ours: a mask that differs from this pair's mask, or an image whose stored
    provenance is another pair's or missing."""
    image, mask = folder / expected["image"], folder / expected["mask"]
    if _is_regular_file(mask) and not np.array_equal(read_mask(mask), item.mask):
        raise ExportError(
            f"{mask} exists, has no row in the manifest and differs from this pair's mask {item.source} (left by "
            "another program or other masks); delete it or choose a new output folder"
        )
    if not _is_regular_file(image):
        return None
    stored = _stored_provenance(image) or {}
    row = {**{field: str(stored.get(field, "")) for field in MANIFEST_FIELDS}, "mask": expected["mask"]}
    if not _complete(row) or any(str(stored.get(f)) != str(expected[f]) for f in (*_IDENTITY_FIELDS, "image")):
        raise ExportError(
            f"{image} exists, has no row in the manifest and its stored provenance is not this pair's (left by "
            "another program or other settings); delete it or choose a new output folder"
        )
    return row


def _write_pair(folder: Path, item: MaskItem, image: np.ndarray | None, row: dict, pixel_size: float | None) -> None:
    """Write the pair's mask and image (``None``: the image is there already) with ``row`` as their provenance.

    A mask written here is removed again when its image cannot be written, so no half pair stays behind.
    """
    info = json.dumps(row)
    mask_path, image_path = folder / row["mask"], folder / row["image"]
    made_mask = False
    with _file_errors(mask_path):
        if not _is_regular_file(mask_path):
            write_tiff(mask_path, item.mask, pixel_size_nm=pixel_size, info=info)
            made_mask = True
    if image is None:
        return
    try:
        with _file_errors(image_path):
            write_tiff(image_path, image, pixel_size_nm=pixel_size, info=info)
    except BaseException:
        if made_mask:
            mask_path.unlink()
        raise


def check_output_paths(folder: Path, preview: Path | None = None) -> None:
    """Before any work: OutputPathError for an output folder that is not a folder or cannot be made or written
    in, ExportError for a preview path where no PNG can go (not a .png name, a folder, a link, or in a folder that
    does not exist)."""
    check_output_folder(folder)
    if preview is None:
        return
    preview = Path(preview)
    if preview.suffix.lower() != ".png":
        raise ExportError(f"{preview}: the preview is a PNG file; give a name ending in .png")
    if preview.is_symlink() or (preview.exists() and not preview.is_file()):
        raise ExportError(f"{preview} is a folder or a link; give the preview's file name, such as preview.png")
    if not preview.parent.is_dir():
        raise ExportError(f"{preview}: folder {preview.parent} does not exist; create it or give another preview path")


def _prepare_folder(folder: Path, masks: MaskSequence) -> None:
    """Check the output folder before any work (not a file, not the masks' own folder) and make its subfolders."""
    check_output_paths(folder)
    if masks.folder is not None:
        outputs = {(folder / sub).resolve() for sub in ("", "images", "masks")}
        if Path(masks.folder).resolve() in outputs:
            raise ExportError(
                f"{folder}: the masks are read from {masks.folder}, where this export would write; choose another "
                "output folder"
            )
    with _file_errors(folder):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(exist_ok=True)


def export_pairs(
    masks: Sequence[MaskItem],
    model: LoadedModel,
    folder: Path,
    settings: SamplerSettings,
    *,
    samples_per_mask: int = 1,
    callback: Callable[[ExportProgress], bool | None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ExportSummary:
    """Generate and write ``samples_per_mask`` pairs per mask into ``folder``; resume where an earlier run stopped.

    Pair ``i`` (masks in order, samples within a mask) is named ``MASK_sSSS`` and gets seed
    ``settings.seed + i``, so a resumed run makes the same pairs as an uninterrupted one. Both TIFFs of a pair
    carry its manifest row (and a digest of its mask) as JSON in ImageJ's "Info" property; files of a pair
    without a manifest row (a run killed between writing and recording) are recorded when that provenance says
    they are this pair, and refused otherwise. ``callback`` gets an ``ExportProgress`` after every sampler step;
    returning True cancels there. ``should_stop`` is polled before every tile's network call (see ``generate``);
    returning True cancels there, without waiting for the end of a step. A cancelled export writes no partial
    pair.

    ``masks`` are made or read one at a time (a :class:`MaskSequence`; a list is fine too) and each is checked
    just before its pairs are made. At most ``settings.batch_size`` images are held at a time.

    With ``world_size`` > 1 this process makes only the pairs ``i`` with ``i % world_size == rank`` and
    records them in ``manifest.rank{rank}.csv``; together the ranks make exactly the pairs of one process.
    Call :func:`merge_manifests` once all ranks have returned. With one process the manifest is merged here.

    Raises:
        ExportError: the folder holds pairs made with other settings, another export is writing to it, a file in
            the way is not this export's, or a file cannot be written (disk full, permissions).
        ValueError: a bad mask, bad settings or a bad rank.
    """
    if samples_per_mask < 1:
        raise ValueError(f"samples_per_mask must be at least 1, got {samples_per_mask}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {settings.batch_size}")
    if not 0 <= settings.seed <= LARGEST_SEED - len(masks) * samples_per_mask:
        raise ValueError(f"seed must be in 0..{LARGEST_SEED - len(masks) * samples_per_mask} (pair i uses seed + i)")
    masks, folder = _as_mask_sequence(masks), Path(folder)
    _prepare_folder(folder, masks)
    with _export_lock(folder, rank, world_size):
        summary = _export_locked(
            masks, model, folder, settings.resolved(model), samples_per_mask, callback, should_stop, rank, world_size
        )
        if world_size == 1 and not summary.cancelled:
            _merge(folder)
    return summary


def _finished_index(folder: Path, model: LoadedModel, settings: SamplerSettings) -> dict[str, int]:
    """The pair number of every recorded pair by name, after checking that every row has this export's settings."""
    expected = provenance(model, settings, seed=0, source="")
    finished: dict[str, int] = {}
    for row in _complete_rows(folder):
        _check_same_settings(folder, row, expected, settings.seed)
        finished[row["name"]] = int(row["pair"])
    return finished


@dataclass
class _Export:
    """One export's (or one rank's) run through its pairs once the folder is checked and locked: which pairs are
    finished, which files can be recorded as they are, and the images to make, a batch at a time."""

    folder: Path
    model: LoadedModel
    settings: SamplerSettings
    manifest: Path
    finished: dict[str, int]
    total: int
    callback: Callable[[ExportProgress], bool | None] | None
    should_stop: Callable[[], bool] | None
    done: int = 0
    written: int = 0
    skipped: int = 0

    def mask_pairs(self, masks: MaskSequence, index: int, pairs: range, first: int) -> bool:
        """Make the pairs ``pairs`` of mask ``index`` (pair ``first`` is its sample 0); False when cancelled.

        The mask is made or read and checked only when one of its pairs is not finished yet.
        """
        item: MaskItem | None = None
        digest = ""
        todo: list[dict] = []
        for pair in pairs:
            name = f"{masks.name(index)}_s{pair - first:03d}"
            if _is_finished(self.folder, name, pair, self.finished):
                self._count_skipped()
                continue
            if item is None:
                item = _checked_mask(masks[index], self.model.config.num_classes)
                digest = _mask_sha256(item.mask)
            row = self._row(item, name, pair, pair - first, digest)
            stored = _recordable_provenance(self.folder, item, row)
            if stored is not None:  # written by a run that died before recording it
                _write_pair(self.folder, item, None, stored, self.model.config.pixel_size_nm)
                _append_row(self.manifest, stored)
                self._count_skipped()
                continue
            todo.append(row)
            if len(todo) == self.settings.batch_size:
                if not self._make(item, todo):
                    return False
                todo = []
        return not todo or self._make(item, todo)

    def _count_skipped(self) -> None:
        self.skipped += 1
        self.done += 1

    def _row(self, item: MaskItem, name: str, pair: int, sample: int, digest: str) -> dict:
        """The manifest row of a pair, with the digest of its mask that only the TIFFs carry."""
        row = provenance(self.model, self.settings, seed=self.settings.seed + pair, source=item.source)
        files = {"name": name, "pair": pair, "image": f"images/{name}.tif", "mask": f"masks/{name}.tif"}
        return {**row, **files, "sample": sample, "mask_sha256": digest}

    def _make(self, item: MaskItem | None, rows: list[dict]) -> bool:
        """Generate the images of ``rows`` (one batch) and write and record their pairs; False when cancelled."""
        assert item is not None  # rows exist only once the mask is read

        def on_step(progress: GenerationProgress, done: int = self.done) -> bool:
            if self.callback is None:
                return False
            return bool(self.callback(ExportProgress(done, self.total, item.name, progress.completed, progress.total)))

        settings = self.settings
        try:
            images = generate(
                np.stack([item.mask] * len(rows)),
                self.model,
                sampler=settings.sampler,
                steps=settings.steps,
                guidance=settings.guidance,
                class_guidance=settings.class_guidance,
                guidance_interval=settings.guidance_interval,
                seed=[row["seed"] for row in rows],
                device=settings.device,
                precision=settings.precision,
                batch_size=settings.batch_size,
                callback=on_step,
                should_stop=self.should_stop,
            )
        except SamplingCancelled:
            return False
        for row, image in zip(rows, images, strict=True):
            _write_pair(self.folder, item, image, row, self.model.config.pixel_size_nm)
            _append_row(self.manifest, row)
            self.written += 1
            self.done += 1
        return True


def _checked_mask(item: MaskItem, num_classes: int) -> MaskItem:
    """``item`` when its mask is a 2-D label image of the model's classes; ValueError naming its source otherwise."""
    if np.ndim(item.mask) != 2:
        raise ValueError(f"{item.source}: expected a 2-D mask (H, W), got shape {np.shape(item.mask)}")
    check_mask(item.mask, num_classes, name=item.source)
    return item


def _export_locked(
    masks: MaskSequence,
    model: LoadedModel,
    folder: Path,
    settings: SamplerSettings,
    samples_per_mask: int,
    callback: Callable[[ExportProgress], bool | None] | None,
    should_stop: Callable[[], bool] | None,
    rank: int,
    world_size: int,
) -> ExportSummary:
    """The work of :func:`export_pairs` once the folder is checked and locked."""
    manifest = folder / (MANIFEST if world_size == 1 else _RANK_MANIFEST.format(rank))
    if world_size == 1:  # the ranks of a torchrun job share the folder: one's temporary file may be in use
        with _file_errors(folder):
            _remove_leftover_temporaries(folder)
    _drop_incomplete_rows(manifest)
    total = len(range(rank, len(masks) * samples_per_mask, world_size))
    finished = _finished_index(folder, model, settings)
    run = _Export(folder, model, settings, manifest, finished, total, callback, should_stop)
    for index in range(len(masks)):
        first = index * samples_per_mask
        pairs = range(first + (rank - first) % world_size, first + samples_per_mask, world_size)
        if pairs and not run.mask_pairs(masks, index, pairs, first):
            return ExportSummary(folder, run.written, run.skipped, cancelled=True)
    return ExportSummary(folder, run.written, run.skipped, cancelled=False)


def _is_finished(folder: Path, name: str, pair: int, finished: Mapping[str, int]) -> bool:
    """True when the pair's row and both files exist; a row with another pair number means the masks changed."""
    if name not in finished:
        return False
    if finished[name] != pair:
        raise ExportError(
            f"{folder}: pair {name!r} was number {finished[name]} in the earlier export and is number {pair} now "
            "(other masks or another number of samples per mask); choose a new output folder or the same masks"
        )
    return _is_regular_file(folder / "images" / f"{name}.tif") and _is_regular_file(folder / "masks" / f"{name}.tif")


def write_preview(folder: Path, path: Path, count: int = 4) -> Path:
    """Write a PNG of the first ``count`` pairs of an export: one row per pair, mask left and image right.

    Images are shown symmetric around their median (``contrast_limits``), masks from 0 to their largest label.
    Pairs of another size than the first are left out, so that the tiles form a grid.
    """
    folder = Path(folder)
    # a pair may be listed twice (a merge cut short), so take enough rows for ``count`` distinct ones
    first = heapq.nsmallest(count * len(_manifest_files(folder)), _complete_rows(folder), key=lambda r: int(r["pair"]))
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
    with _file_errors(Path(path)):
        write_png(path, grid(tiles))
    return Path(path)
