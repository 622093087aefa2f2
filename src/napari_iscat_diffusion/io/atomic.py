"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

The data go to a hidden temporary file in the same folder (``os.replace`` is atomic only within one file
system), are flushed to disk, and the file is renamed over the target; on any error, KeyboardInterrupt
included, the temporary file is removed and the target is untouched.

A process killed outright (kill -9, power loss) cannot remove its temporary file, so the file's name says which
process on which host wrote it, ``.NAME.HOST-PID-RANDOM.tmp``, and ``remove_stale_temporaries`` removes those of
this host whose process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Which host wrote a temporary file: on a folder shared between machines, only this host's processes can be
# checked for being alive.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# The bytes of the target's name kept in a temporary file's name: with ".", ".HOST-PID-RANDOM.tmp" (at most 35 bytes)
# it stays within the 255 bytes a name may have, so that any name that can be written has a temporary file.
_NAME_BYTES = 220


def _temporary_stem(path: Path) -> str:
    """The part of ``path``'s name that its temporary files carry (all of it, unless the name is very long)."""
    return os.fsdecode(os.fsencode(path.name)[:_NAME_BYTES])


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing that replaces ``path`` when the ``with`` block ends without error.

    Args:
        path: the file to write; its folder must exist.
        mode: "wb" (binary) or "w" (text).
        **kwargs: passed to ``open`` (e.g. ``newline=""``, ``encoding="utf-8"``).

    Yields:
        the open temporary file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    temporary = path.with_name(f".{_temporary_stem(path)}.{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    try:
        # "x": never reuse a file; open() honours the umask (tempfile would always give 0o600).
        with open(temporary, mode.replace("w", "x"), **kwargs) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())  # data on disk before the rename
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "wb") as file:
        file.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see the module docstring)."""
    with atomic_open(path, "w", encoding="utf-8") as file:
        file.write(text)


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that writes to ``path`` (a file; or a folder: to any file in it) by processes of
    this host that are gone (killed before they could clean up) left beside it; a live writer's file is kept.
    Lists the folder, so it is meant for files written now and then (checkpoints), not for each of many files in
    one folder. Does nothing where processes cannot be probed (not POSIX). Returns the files removed."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only on POSIX
        return []
    path = Path(path)
    folder, target = (path, ".+") if path.is_dir() else (path.parent, re.escape(_temporary_stem(path)))
    pattern = re.compile(rf"\.{target}\.{_HOST}-(\d+)-[0-9a-f]{{12}}\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(folder / name)
                removed.append(folder / name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid at all: keep the file
        return True
    return True
