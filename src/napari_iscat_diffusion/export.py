"""Batch export of synthetic pairs: masks in; ``images/NAME.tif``, ``masks/NAME.tif`` and ``manifest.csv`` out.

Pure numpy and the diffusion core (no napari or Qt), so the Batch export widget and the command line
drive the same code. Each TIFF is written atomically (``write_tiff``); a pair counts as finished when
both files exist and ``manifest.csv`` holds its row, which is appended (and synced) after the files.
An interrupted export therefore resumes by skipping finished pairs, and nothing is ever overwritten.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .diffusion import GenerationProgress, LoadedModel, SamplingCancelled, generate, validate_mask
from .io.tiff_pairs import TIFF_SUFFIXES, read_mask, write_tiff
from .iscat.masks import random_mask
from .synthetic import SamplerSettings, provenance

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = (
    "name",
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
    "precision",
    "package_version",
)
# A folder holds one export: rows must agree on these, so that a resumed run cannot mix settings.
_SETTINGS_FIELDS = ("checkpoint_sha256", "sampler", "steps", "guidance")


class ExportError(ValueError):
    """The export cannot go on (a folder with another export in it, a stray file); the message says what to do."""


@dataclass(frozen=True)
class MaskItem:
    """One 2-D label mask to export, with the name its pairs take and where it came from."""

    name: str
    mask: np.ndarray
    source: str


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
    """What an export did: pairs written, pairs skipped as already finished, whether it was cancelled."""

    folder: Path
    written: int
    skipped: int
    cancelled: bool


def _safe_name(name: str) -> str:
    """A file-name stem: anything but letters, digits, ``-``, ``_`` and ``.`` becomes ``_``."""
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "mask"


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
    return items


def masks_from_folder(folder: Path) -> list[MaskItem]:
    """Every TIFF mask directly in ``folder`` (its ``masks/`` subfolder when it has one), sorted by name."""
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
    return [MaskItem(_safe_name(p.stem), read_mask(p), str(p)) for p in paths]


def random_masks(
    n: int,
    shape: tuple[int, int],
    *,
    particles: int = 20,
    class_proportions: Sequence[float] = (1.0,),
    radius: float = 3.0,
    min_distance: float | None = None,
    seed: int = 0,
) -> list[MaskItem]:
    """``n`` random particle masks (``iscat.masks.random_mask``) named ``random_NNNNN``; a seed gives the same masks."""
    rng = np.random.default_rng(seed)
    distance = 2 * radius + 2 if min_distance is None else min_distance
    return [
        MaskItem(
            f"random_{i:05d}",
            random_mask(
                shape, particles, min_distance=distance, class_proportions=class_proportions, radius=radius, rng=rng
            ).mask,
            f"random(seed={seed}, index={i})",
        )
        for i in range(n)
    ]


def _finished_rows(manifest: Path) -> dict[str, dict]:
    """Complete manifest rows by pair name (a row cut short by a crash is ignored)."""
    if not manifest.exists():
        return {}
    with open(manifest, newline="") as file:
        rows = list(csv.DictReader(file))
    return {row["name"]: row for row in rows if all(row.get(f) not in (None, "") for f in ("name", "image", "mask"))}


def _check_same_settings(folder: Path, rows: Mapping[str, dict], expected: dict) -> None:
    for row in rows.values():
        different = [f for f in _SETTINGS_FIELDS if str(row.get(f)) != str(expected[f])]
        if different:
            raise ExportError(
                f"{folder} already holds an export made with other settings ({', '.join(different)} differ, "
                f"for example pair {row['name']!r}); choose a new output folder or the same model and settings"
            )


def _append_row(manifest: Path, row: dict) -> None:
    """Append one row and sync it, writing the header first for a new file."""
    new = not manifest.exists() or manifest.stat().st_size == 0
    with open(manifest, "a+", newline="") as file:
        if not new:  # a crash may have cut the last line short: start a fresh line
            file.seek(file.tell() - 1)
            if file.read(1) != "\n":
                file.write("\n")
        writer = csv.DictWriter(file, fieldnames=MANIFEST_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        file.flush()
        os.fsync(file.fileno())


def export_pairs(
    masks: Sequence[MaskItem],
    model: LoadedModel,
    folder: Path,
    settings: SamplerSettings,
    *,
    samples_per_mask: int = 1,
    callback: Callable[[ExportProgress], bool | None] | None = None,
) -> ExportSummary:
    """Generate and write ``samples_per_mask`` pairs per mask into ``folder``; resume where an earlier run stopped.

    Pair ``i`` (masks in order, samples within a mask) is named ``MASK_sSSS`` and gets seed
    ``settings.seed + i``, so a resumed run makes the same pairs as an uninterrupted one. ``callback``
    gets an ``ExportProgress`` after every sampler step; returning True cancels within that step
    (no partial pair is written).

    Raises:
        ExportError: the folder holds pairs made with other settings, or a pair's file exists without its manifest row.
        ValueError: a bad mask or bad settings.
    """
    if samples_per_mask < 1:
        raise ValueError(f"samples_per_mask must be at least 1, got {samples_per_mask}")
    for item in masks:  # fail before writing anything, naming the bad mask
        if np.ndim(item.mask) != 2:
            raise ValueError(f"{item.source}: expected a 2-D mask (H, W), got shape {np.shape(item.mask)}")
        validate_mask(item.mask, model.config.num_classes, name=item.source)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    manifest = folder / MANIFEST
    finished = _finished_rows(manifest)
    settings = settings.resolved(model)
    _check_same_settings(folder, finished, provenance(model, settings, seed=0, source=""))
    pixel_size = model.config.pixel_size_nm
    total = len(masks) * samples_per_mask
    done = written = skipped = 0
    for index, item in enumerate(masks):
        names = [f"{item.name}_s{s:03d}" for s in range(samples_per_mask)]
        todo = [s for s, name in enumerate(names) if not _is_finished(folder, name, finished)]
        skipped += samples_per_mask - len(todo)
        done += samples_per_mask - len(todo)
        if not todo:
            continue
        for s in todo:
            for kind in ("images", "masks"):
                path = folder / kind / f"{names[s]}.tif"
                if path.exists():
                    raise ExportError(
                        f"{path} exists but {MANIFEST} has no row for it (left by another program or an interrupted "
                        "run); delete it or choose a new output folder"
                    )
        seeds = [settings.seed + index * samples_per_mask + s for s in todo]

        def on_step(progress: GenerationProgress, done: int = done, name: str = item.name) -> bool:
            if callback is None:
                return False
            report = ExportProgress(done, total, name, progress.completed, progress.total)
            return bool(callback(report))

        try:
            images = generate(
                np.stack([item.mask] * len(todo)),
                model,
                sampler=settings.sampler,
                steps=settings.steps,
                guidance=settings.guidance,
                seed=seeds,
                device=settings.device,
                precision=settings.precision,
                batch_size=settings.batch_size,
                callback=on_step,
            )
        except SamplingCancelled:
            return ExportSummary(folder, written, skipped, cancelled=True)
        for s, seed, image in zip(todo, seeds, images, strict=True):
            name = names[s]
            write_tiff(folder / "masks" / f"{name}.tif", item.mask, pixel_size_nm=pixel_size)
            write_tiff(folder / "images" / f"{name}.tif", image, pixel_size_nm=pixel_size)
            row = provenance(model, settings, seed=seed, source=item.source)
            files = {"name": name, "image": f"images/{name}.tif", "mask": f"masks/{name}.tif", "sample": s}
            _append_row(manifest, {**row, **files})
            written += 1
            done += 1
    return ExportSummary(folder, written, skipped, cancelled=False)


def _is_finished(folder: Path, name: str, rows: Mapping[str, dict]) -> bool:
    return name in rows and (folder / "images" / f"{name}.tif").exists() and (folder / "masks" / f"{name}.tif").exists()
