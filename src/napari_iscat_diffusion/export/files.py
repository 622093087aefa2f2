"""The files of an export folder: only regular files are read or written, an OSError becomes a one-line
ExportError, a lock keeps a second export out, and the temporary files of a killed export are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from ..io.output_paths import check_output_folder

# The names atomic_open gives the temporary files of an export's files (".NAME.HOST-PID-RANDOM.tmp": hex digits,
# decimal digits and dashes after the name).
_TIFF_TEMPORARY = r"\..+\.tif\.[0-9a-f-]+\.tmp"
_MANIFEST_TEMPORARY = r"\.manifest(\.rank\d+)?\.csv\.[0-9a-f-]+\.tmp"
_LOCK = ".export.lock"
_RANK_LOCK = ".export.rank{}.lock"


class ExportError(ValueError):
    """The export cannot go on (a folder with another export in it, a stray file); the message says what to do."""


def is_regular_file(path: Path) -> bool:
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


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` (O_NOFOLLOW where the system has it)."""
    is_regular_file(path)
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


@contextlib.contextmanager
def file_errors(path: Path) -> Iterator[None]:
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

    descriptor = open_no_follow(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(descriptor, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export is writing to {folder}; wait for it or choose another folder") from None
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


@contextlib.contextmanager
def export_lock(folder: Path, rank: int, world_size: int) -> Iterator[None]:
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


def remove_leftover_temporaries(folder: Path) -> None:
    """Remove the temporary files of ``atomic_open`` that a killed export left (``.NAME.HOST-PID-RANDOM.tmp`` beside
    its pair files and manifests). Call it only with the folder's exclusive lock held: no other export writes."""
    for place, pattern in (
        (folder, _MANIFEST_TEMPORARY),
        (folder / "images", _TIFF_TEMPORARY),
        (folder / "masks", _TIFF_TEMPORARY),
    ):
        for path in place.iterdir():
            if re.fullmatch(pattern, path.name) and is_regular_file(path):
                path.unlink()


def check_output_paths(folder: Path, preview: Path | None = None) -> None:
    """Before any work: OutputPathError for an output folder that is not a folder or cannot be made or written
    in, ExportError for a preview path where no PNG can go (not a .png name, a folder, a link), OutputPathError for
    a preview whose folder cannot be made (it may be the output folder, made by the export)."""
    check_output_folder(folder)
    if preview is None:
        return
    preview = Path(preview)
    if preview.suffix.lower() != ".png":
        raise ExportError(f"{preview}: the preview is a PNG file; give a name ending in .png")
    if preview.is_symlink() or (preview.exists() and not preview.is_file()):
        raise ExportError(f"{preview} is a folder or a link; give the preview's file name, such as preview.png")
    check_output_folder(preview.parent, "the preview's folder")
