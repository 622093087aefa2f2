"""Checks, before any work, that an output can be written: a new file, or a folder to write files into.

Commands and widgets call them before they load a model, so that a typo in an output path is found in a
second, not after an hour of sampling. A folder is tried with a real temporary file rather than
``os.access``, which says yes to root on a read-only or special file system.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path cannot be written; the message names it and says why."""


def check_output_folder(folder: str | os.PathLike[str], what: str = "") -> None:
    """Raise OutputPathError unless ``folder`` is, or can be made as, a folder that takes new files.

    Args:
        folder: the folder; missing folders are fine when the nearest existing one above takes new files.
        what: how the message names the path (e.g. "--out"); "" names the path alone.
    """
    folder = Path(folder)
    name = f"{what} {folder}".strip()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{name} is a file, not a folder; choose another folder")
    _check_can_make(folder, name)


def check_new_file(path: str | os.PathLike[str], what: str = "") -> None:
    """Raise unless ``path`` can become a new file: FileExistsError when it exists (outputs are never
    overwritten, a dangling link included), OutputPathError when it is a folder or its folder cannot take it.

    Args:
        path: the file to be written; its missing folders are made when it is written.
        what: how the message names the path (e.g. "--out"); "" names the path alone.
    """
    path = Path(path)
    name = f"{what} {path}".strip()
    if path.is_dir():
        raise OutputPathError(f"{name} is a folder; give the name of a new file")
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{name} already exists; choose another file")
    _check_can_make(path.parent, name)


def _check_can_make(folder: Path, name: str) -> None:
    """OutputPathError (about ``name``) unless the nearest existing folder at or above ``folder`` takes new files."""
    existing = next(path for path in (folder.absolute(), *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise OutputPathError(f"{name}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise OutputPathError(f"{name}: cannot write into folder {existing} ({error.strerror})") from None
