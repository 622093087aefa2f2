"""The export loop: generate the pairs of every mask a batch at a time, write both TIFFs of a pair with its
provenance and record its manifest row; on a resumed run skip finished pairs and record the files a killed run
wrote but did not record, when their stored provenance says they are this pair.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..diffusion import GenerationProgress, LoadedModel, SamplingCancelled, check_mask, generate
from ..diffusion.generate import LARGEST_SEED
from ..io.tiff_pairs import read_mask, read_tiff_info, write_tiff
from ..synthetic import SamplerSettings, provenance
from .files import (
    ExportError,
    check_output_paths,
    export_lock,
    file_errors,
    is_regular_file,
    remove_leftover_temporaries,
)
from .manifest import (
    MANIFEST,
    MANIFEST_FIELDS,
    RANK_MANIFEST,
    SETTINGS_FIELDS,
    append_row,
    check_same_settings,
    complete_rows,
    drop_incomplete_rows,
    is_complete,
    merge_rank_manifests,
)
from .masks import MaskItem, MaskSequence, as_mask_sequence

# What an image's stored provenance must match for a file without a manifest row to count as this pair.
_IDENTITY_FIELDS = ("name", "pair", "seed", "mask_sha256", *SETTINGS_FIELDS)


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
    if is_regular_file(mask) and not np.array_equal(read_mask(mask), item.mask):
        raise ExportError(
            f"{mask} exists, has no row in the manifest and differs from this pair's mask {item.source} (left by "
            "another program or other masks); delete it or choose a new output folder"
        )
    if not is_regular_file(image):
        return None
    stored = _stored_provenance(image) or {}
    row = {**{field: str(stored.get(field, "")) for field in MANIFEST_FIELDS}, "mask": expected["mask"]}
    if not is_complete(row) or any(str(stored.get(f)) != str(expected[f]) for f in (*_IDENTITY_FIELDS, "image")):
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
    with file_errors(mask_path):
        if not is_regular_file(mask_path):
            write_tiff(mask_path, item.mask, pixel_size_nm=pixel_size, info=info)
            made_mask = True
    if image is None:
        return
    try:
        with file_errors(image_path):
            write_tiff(image_path, image, pixel_size_nm=pixel_size, info=info)
    except BaseException:
        if made_mask:
            mask_path.unlink()
        raise


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
    with file_errors(folder):
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
    masks, folder = as_mask_sequence(masks), Path(folder)
    _prepare_folder(folder, masks)
    with export_lock(folder, rank, world_size):
        summary = _export_locked(
            masks, model, folder, settings.resolved(model), samples_per_mask, callback, should_stop, rank, world_size
        )
        if world_size == 1 and not summary.cancelled:
            merge_rank_manifests(folder)
    return summary


def _finished_index(folder: Path, model: LoadedModel, settings: SamplerSettings) -> dict[str, int]:
    """The pair number of every recorded pair by name, after checking that every row has this export's settings."""
    expected = provenance(model, settings, seed=0, source="")
    finished: dict[str, int] = {}
    for row in complete_rows(folder):
        check_same_settings(folder, row, expected, settings.seed)
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
                append_row(self.manifest, stored)
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
            append_row(self.manifest, row)
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
    manifest = folder / (MANIFEST if world_size == 1 else RANK_MANIFEST.format(rank))
    if world_size == 1:  # the ranks of a torchrun job share the folder: one's temporary file may be in use
        with file_errors(folder):
            remove_leftover_temporaries(folder)
    drop_incomplete_rows(manifest)
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
    return is_regular_file(folder / "images" / f"{name}.tif") and is_regular_file(folder / "masks" / f"{name}.tif")
