"""The manifest of an export: one CSV row per finished pair, with formula-safe cells; reading it a row at a
time (a row cut short by a crash is ignored), appending and syncing a row, and folding the per-rank manifests
of a multi-process export into ``manifest.csv``.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..io.atomic import atomic_open
from .files import ExportError, export_lock, file_errors, is_regular_file, open_no_follow

MANIFEST = "manifest.csv"
RANK_MANIFEST = "manifest.rank{}.csv"
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
SETTINGS_FIELDS = ("checkpoint_sha256", "sampler", "steps", "guidance", "class_guidance", "guidance_interval")
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


def is_complete(row: dict) -> bool:
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
    with file_errors(manifest), open(open_no_follow(manifest, os.O_RDONLY), newline="", encoding="utf-8") as file:
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
    return row if is_complete(row) else None


def manifest_files(folder: Path) -> list[Path]:
    """``manifest.csv`` and the per-rank manifests of an unmerged multi-process export, those that exist."""
    candidates = [folder / MANIFEST, *sorted(folder.glob(RANK_MANIFEST.format("*")))]
    return [path for path in candidates if is_regular_file(path)]


def complete_rows(folder: Path) -> Iterator[dict]:
    """The complete rows of every manifest of ``folder``, one at a time."""
    for manifest in manifest_files(Path(folder)):
        yield from (row for row in _read_manifest(manifest) if row is not None)


def count_pairs(folder: Path) -> int:
    """The number of pairs that the manifests of an export folder list (each pair once), read a row at a time."""
    return len({row["name"] for row in complete_rows(folder)})


def finished_pairs(folder: Path) -> dict[str, dict]:
    """The complete manifest rows of an export folder by pair name, from ``manifest.csv`` and any rank manifests.

    A row cut short by a crash is ignored; a pair listed twice (a merge interrupted before it removed the rank
    files) counts once. Raises ExportError for a manifest that is a link or not ours.
    """
    return {row["name"]: row for row in complete_rows(folder)}


def _write_manifest(manifest: Path, rows: Iterator[dict] | Sequence[dict]) -> None:
    """Replace ``manifest`` atomically with ``rows`` (cells neutralised)."""
    with file_errors(manifest), atomic_open(manifest, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(MANIFEST_FIELDS)
        writer.writerows([_neutralised(row.get(field, ""), field) for field in MANIFEST_FIELDS] for row in rows)


def merge_rank_manifests(folder: Path) -> Path:
    """:func:`merge_manifests` without taking the folder's lock (the caller holds it)."""
    manifest = folder / MANIFEST
    ranks = [path for path in manifest_files(folder) if path != manifest]
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
    with export_lock(folder, 0, 1):
        return merge_rank_manifests(folder)


def drop_incomplete_rows(manifest: Path) -> None:
    """Rewrite this process's own manifest without the rows a crash cut short, so that none stays beside the new
    row of its pair (atomically: a crash now leaves the old file)."""
    if is_regular_file(manifest) and any(row is None for row in _read_manifest(manifest)):
        _write_manifest(manifest, (row for row in _read_manifest(manifest) if row is not None))


def check_same_settings(folder: Path, row: dict, expected: dict, first_seed: int) -> None:
    """ExportError naming the fields in which ``row`` differs from this export's settings ``expected`` (and its
    first seed ``first_seed``): a folder holds one export."""
    different = [f for f in SETTINGS_FIELDS if str(row.get(f) or _BEFORE_COLUMN.get(f, "")) != str(expected[f])]
    if int(row["seed"]) - int(row["pair"]) != first_seed:
        different.append("seed")
    if different:
        raise ExportError(
            f"{folder} already holds an export made with other settings ({', '.join(different)} differ, "
            f"for example pair {row['name']!r}); choose a new output folder or the same model and settings"
        )


def append_row(manifest: Path, row: dict) -> None:
    """Append one row (cells neutralised) and sync it, writing the header first for a new file."""
    with file_errors(manifest):
        new = not is_regular_file(manifest) or manifest.stat().st_size == 0
        text = io.StringIO()
        writer = csv.writer(text)
        if new:
            writer.writerow(MANIFEST_FIELDS)
        writer.writerow([_neutralised(row.get(field, ""), field) for field in MANIFEST_FIELDS])
        data = text.getvalue().encode("utf-8")
        descriptor = open_no_follow(manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            while data:  # one write call in practice: the row goes on at once or not at all
                data = data[os.write(descriptor, data) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
