"""Batch export of synthetic pairs: masks in; ``images/NAME.tif``, ``masks/NAME.tif`` and ``manifest.csv`` out.

Pure numpy and the diffusion core (no napari or Qt), so the Batch export widget and the command line
drive the same code. Each TIFF is written atomically (``write_tiff``); a pair counts as finished when
both files exist and a manifest holds its row, which is appended (and synced) after the files. An
interrupted export therefore resumes by skipping finished pairs, and nothing is ever overwritten.

Several processes (``torchrun``) share one export: pair ``i`` belongs to rank ``i % world_size``, and each
rank appends to its own ``manifest.rank{r}.csv``, so no two processes write one file. After all ranks have
finished, one process calls :func:`merge_manifests` to fold them into ``manifest.csv``.
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
from .io.atomic import atomic_open
from .io.tiff_pairs import TIFF_SUFFIXES, read_image, read_mask, read_tiff, write_tiff
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
    """What an export (or one rank of it) did: pairs written, pairs skipped as finished, whether it was cancelled."""

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


def _manifest_files(folder: Path) -> list[Path]:
    """``manifest.csv`` and the per-rank manifests of an unmerged multi-process export, those that exist."""
    return [path for path in [folder / MANIFEST, *sorted(folder.glob(_RANK_MANIFEST.format("*")))] if path.is_file()]


def finished_pairs(folder: Path) -> dict[str, dict]:
    """The complete manifest rows of an export folder by pair name, from ``manifest.csv`` and any rank manifests.

    A row cut short by a crash is ignored; a pair listed twice (a merge interrupted before it removed the rank
    files) counts once.
    """
    rows: dict[str, dict] = {}
    for manifest in _manifest_files(Path(folder)):
        with open(manifest, newline="") as file:
            for row in csv.DictReader(file):
                if all(row.get(field) not in (None, "") for field in MANIFEST_FIELDS if field not in _OPTIONAL_FIELDS):
                    rows[row["name"]] = row
    return rows


def merge_manifests(folder: Path) -> Path:
    """Fold the per-rank manifests into ``manifest.csv`` (rows in pair order) and remove them; returns its path.

    Run it once, in one process, after every rank has finished. ``manifest.csv`` is replaced atomically and
    the rank files are removed only afterwards, so an interruption loses no row.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    ranks = [path for path in _manifest_files(folder) if path != manifest]
    if not ranks:
        return manifest
    rows = sorted(finished_pairs(folder).values(), key=lambda row: int(row["pair"]))
    with atomic_open(manifest, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=MANIFEST_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for path in ranks:
        path.unlink()
    return manifest


def _check_same_settings(folder: Path, rows: Mapping[str, dict], expected: dict, first_seed: int) -> None:
    for row in rows.values():
        different = [f for f in _SETTINGS_FIELDS if str(row.get(f) or _BEFORE_COLUMN.get(f, "")) != str(expected[f])]
        if int(row["seed"]) - int(row["pair"]) != first_seed:
            different.append("seed")
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


def _write_new(path: Path, array: np.ndarray, pixel_size_nm: float | None) -> None:
    """Write ``array`` to ``path`` unless the file is already there with exactly this content.

    A file without a manifest row is left by a run killed between writing a pair and recording it; it is
    kept when it holds what this pair is (the seeds make pairs reproducible), and never replaced otherwise.
    """
    if not path.exists():
        write_tiff(path, array, pixel_size_nm=pixel_size_nm)
    elif not np.array_equal(read_tiff(path), array):
        raise ExportError(
            f"{path} exists, has no row in the manifest and differs from the pair this export makes (left by another "
            "program or other settings); delete it or choose a new output folder"
        )


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
    ``settings.seed + i``, so a resumed run makes the same pairs as an uninterrupted one. ``callback``
    gets an ``ExportProgress`` after every sampler step; returning True cancels there. ``should_stop`` is
    polled before every tile's network call (see ``generate``); returning True cancels there, without
    waiting for the end of a step. A cancelled export writes no partial pair.

    With ``world_size`` > 1 this process makes only the pairs ``i`` with ``i % world_size == rank`` and
    records them in ``manifest.rank{rank}.csv``; together the ranks make exactly the pairs of one process.
    Call :func:`merge_manifests` once all ranks have returned. With one process the manifest is merged here.

    Raises:
        ExportError: the folder holds pairs made with other settings, or a file in the way differs from its pair.
        ValueError: a bad mask, bad settings or a bad rank.
    """
    if samples_per_mask < 1:
        raise ValueError(f"samples_per_mask must be at least 1, got {samples_per_mask}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1, got rank {rank} of world_size {world_size}")
    for item in masks:  # fail before writing anything, naming the bad mask
        if np.ndim(item.mask) != 2:
            raise ValueError(f"{item.source}: expected a 2-D mask (H, W), got shape {np.shape(item.mask)}")
        validate_mask(item.mask, model.config.num_classes, name=item.source)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    manifest = folder / (MANIFEST if world_size == 1 else _RANK_MANIFEST.format(rank))
    finished = finished_pairs(folder)
    settings = settings.resolved(model)
    _check_same_settings(folder, finished, provenance(model, settings, seed=0, source=""), settings.seed)
    pixel_size = model.config.pixel_size_nm
    total = len(range(rank, len(masks) * samples_per_mask, world_size))
    done = written = skipped = 0
    for index, item in enumerate(masks):
        todo = []
        for s in range(samples_per_mask):
            pair = index * samples_per_mask + s
            if pair % world_size != rank:
                continue
            name = f"{item.name}_s{s:03d}"
            if _is_finished(folder, name, pair, finished):
                skipped += 1
                done += 1
            else:
                todo.append((pair, s, name))
        if not todo:
            continue
        seeds = [settings.seed + pair for pair, _, _ in todo]

        def on_step(progress: GenerationProgress, done: int = done, name: str = item.name) -> bool:
            if callback is None:
                return False
            return bool(callback(ExportProgress(done, total, name, progress.completed, progress.total)))

        try:
            images = generate(
                np.stack([item.mask] * len(todo)),
                model,
                sampler=settings.sampler,
                steps=settings.steps,
                guidance=settings.guidance,
                class_guidance=settings.class_guidance,
                guidance_interval=settings.guidance_interval,
                seed=seeds,
                device=settings.device,
                precision=settings.precision,
                batch_size=settings.batch_size,
                callback=on_step,
                should_stop=should_stop,
            )
        except SamplingCancelled:
            return ExportSummary(folder, written, skipped, cancelled=True)
        for (pair, s, name), seed, image in zip(todo, seeds, images, strict=True):
            _write_new(folder / "masks" / f"{name}.tif", item.mask, pixel_size)
            _write_new(folder / "images" / f"{name}.tif", image, pixel_size)
            row = provenance(model, settings, seed=seed, source=item.source)
            files = {"name": name, "pair": pair, "image": f"images/{name}.tif", "mask": f"masks/{name}.tif"}
            _append_row(manifest, {**row, **files, "sample": s})
            written += 1
            done += 1
    if world_size == 1:
        merge_manifests(folder)
    return ExportSummary(folder, written, skipped, cancelled=False)


def _is_finished(folder: Path, name: str, pair: int, rows: Mapping[str, dict]) -> bool:
    """True when the pair's row and both files exist; a row with another pair number means the masks changed."""
    if name not in rows:
        return False
    if int(rows[name]["pair"]) != pair:
        raise ExportError(
            f"{folder}: pair {name!r} was number {rows[name]['pair']} in the earlier export and is number {pair} now "
            "(other masks or another number of samples per mask); choose a new output folder or the same masks"
        )
    return (folder / "images" / f"{name}.tif").exists() and (folder / "masks" / f"{name}.tif").exists()


def write_preview(folder: Path, path: Path, count: int = 4) -> Path:
    """Write a PNG of the first ``count`` pairs of an export: one row per pair, mask left and image right.

    Images are shown symmetric around their median (``contrast_limits``), masks from 0 to their largest label.
    Pairs of another size than the first are left out, so that the tiles form a grid.
    """
    folder = Path(folder)
    rows = sorted(finished_pairs(folder).values(), key=lambda row: int(row["pair"]))
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
    write_png(path, grid(tiles))
    return Path(path)
