"""Text from files and file names made safe to print on a terminal (no torch, no Qt: every command may use it)."""

from __future__ import annotations

import sys


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to print on a terminal: every non-printable character (escape codes, newlines) written as a
    Python escape such as ``\\x1b``, and cut to ``limit`` characters ("..." marks a cut)."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return escaped if len(escaped) <= limit else escaped[: max(limit - 3, 0)] + "..."


def printable_line(text: str) -> str:
    """``text`` as one line safe to print on a terminal, however long (see :func:`printable`)."""
    return printable(text, sys.maxsize)
