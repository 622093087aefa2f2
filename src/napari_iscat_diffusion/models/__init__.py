"""Model checkpoints shipped with the package (``*.safetensors`` files in this folder)."""

from __future__ import annotations

from pathlib import Path


def bundled_checkpoints() -> dict[str, Path]:
    """Bundled checkpoints by name (the file stem), sorted; empty when none ships with this version."""
    folder = Path(__file__).parent
    return {path.stem: path for path in sorted(folder.glob("*.safetensors"))}
