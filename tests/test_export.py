"""Batch export core: pairs, manifest, resume, never overwriting, atomic files, settings checks, sharding, preview."""

import csv
import errno
import json
import os
import re
import shutil
import struct
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_iscat_diffusion.diffusion import generate, load_checkpoint
from napari_iscat_diffusion.export import (
    MANIFEST,
    MANIFEST_FIELDS,
    ExportError,
    export_pairs,
    finished_pairs,
    masks_from_arrays,
    masks_from_folder,
    merge_manifests,
    pairs,
    random_masks,
    write_preview,
)
from napari_iscat_diffusion.export.files import export_lock
from napari_iscat_diffusion.export.masks import safe_name
from napari_iscat_diffusion.io.output_paths import OutputPathError
from napari_iscat_diffusion.io.tiff_pairs import read_pixel_size_nm
from napari_iscat_diffusion.iscat.masks import random_mask
from napari_iscat_diffusion.synthetic import SamplerSettings

SETTINGS = SamplerSettings(steps=2, seed=100, device="cpu")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def masks():
    return random_masks(3, (16, 16), particles=4, class_proportions=(1, 1), seed=1)


def _rows(folder):
    with open(folder / MANIFEST, newline="") as file:
        return list(csv.DictReader(file))


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.tif"))}


def test_export_writes_pairs_a_manifest_and_the_pixel_size(tmp_path, model, masks):
    summary = export_pairs(masks, model, tmp_path, SETTINGS, samples_per_mask=2)
    assert (summary.written, summary.skipped, summary.cancelled) == (6, 0, False)
    rows = _rows(tmp_path)
    names = [f"random_{m:05d}_s{s:03d}" for m in range(3) for s in range(2)]
    assert [row["name"] for row in rows] == names
    assert [int(row["pair"]) for row in rows] == list(range(6))
    assert [int(row["seed"]) for row in rows] == [100 + i for i in range(6)]
    assert {row["checkpoint_sha256"] for row in rows} == {model.sha256}
    assert {row["steps"] for row in rows} == {"2"}
    for i, row in enumerate(rows):  # pair i is the image a direct call makes with seed + i
        mask = tifffile.imread(tmp_path / row["mask"])
        np.testing.assert_array_equal(mask, masks[i // 2].mask)
        expected = generate(mask, model, steps=2, seed=100 + i, device="cpu")
        np.testing.assert_array_equal(tifffile.imread(tmp_path / row["image"]), expected)
    assert read_pixel_size_nm(tmp_path / rows[0]["image"]) == pytest.approx(60.0)
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_interrupted_export_resumes_and_overwrites_nothing(tmp_path, model, masks):
    def stop_after_first_pair(progress):
        return progress.pairs_done >= 1

    first = export_pairs(masks, model, tmp_path / "a", SETTINGS, samples_per_mask=1, callback=stop_after_first_pair)
    assert first.cancelled and first.written == 1
    done = _files(tmp_path / "a")
    stamps = {path: path.stat().st_mtime_ns for path in (tmp_path / "a").rglob("*.tif")}
    second = export_pairs(masks, model, tmp_path / "a", SETTINGS)
    assert (second.written, second.skipped, second.cancelled) == (2, 1, False)
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    third = export_pairs(masks, model, tmp_path / "a", SETTINGS)
    assert (third.written, third.skipped) == (0, 3)
    after = _files(tmp_path / "a")
    assert all(after[name] == data for name, data in done.items())
    export_pairs(masks, model, tmp_path / "b", SETTINGS)  # the same as one uninterrupted run
    assert after == _files(tmp_path / "b")
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_a_foreign_file_in_the_way_is_never_overwritten(tmp_path, model, masks):
    (tmp_path / "images").mkdir()
    foreign = tmp_path / "images" / "random_00001_s000.tif"
    tifffile.imwrite(foreign, np.ones((16, 16), np.float32))
    before = foreign.read_bytes()
    with pytest.raises(ExportError, match=r"random_00001_s000\.tif exists"):
        export_pairs(masks, model, tmp_path, SETTINGS)
    assert foreign.read_bytes() == before
    assert [row["name"] for row in _rows(tmp_path)] == ["random_00000_s000"]


def test_a_pair_written_but_not_recorded_is_kept_and_recorded(tmp_path, model, masks):
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    rows = _rows(tmp_path)
    with open(tmp_path / MANIFEST, "w", newline="") as file:  # as if killed before the second row was appended
        writer = csv.DictWriter(file, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerow(rows[0])
    image = tmp_path / rows[1]["image"]
    stamp = image.stat().st_mtime_ns
    summary = export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert (summary.written, summary.skipped) == (0, 2)  # recorded from its stored provenance, not made again
    assert image.stat().st_mtime_ns == stamp
    assert _rows(tmp_path) == rows


def test_a_row_cut_short_by_a_crash_is_ignored(tmp_path, model, masks):
    export_pairs(masks[:1], model, tmp_path, SETTINGS)
    with open(tmp_path / MANIFEST, "a") as file:
        file.write("random_00001_s000,1,images/random_00001_s0")
    assert list(finished_pairs(tmp_path)) == ["random_00000_s000"]
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert [row["name"] for row in _rows(tmp_path) if row["seed"]] == ["random_00000_s000", "random_00001_s000"]


def test_files_are_written_atomically_and_a_full_disk_leaves_no_half_pair(tmp_path, model, masks, monkeypatch):
    real = tifffile.imwrite
    calls = []

    def disk_full_on_the_fourth_file(handle, array, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second pair's image: write half of it, then fail
            handle.write(b"II*\x00half a tiff")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(handle, array, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", disk_full_on_the_fourth_file)
    with pytest.raises(ExportError, match=r"random_00001_s000\.tif: No space left on device; .* export again"):
        export_pairs(masks, model, tmp_path, SETTINGS)
    # the second pair's mask, written before its image failed, is removed again: no half pair
    assert sorted(_files(tmp_path)) == ["images/random_00000_s000.tif", "masks/random_00000_s000.tif"]
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]
    monkeypatch.setattr(tifffile, "imwrite", real)
    summary = export_pairs(masks, model, tmp_path, SETTINGS)
    assert (summary.written, summary.skipped) == (2, 1)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"steps": 3}, "steps"),
        ({"sampler": "ddim"}, "sampler"),
        ({"guidance": 2.0}, "guidance"),
        ({"class_guidance": {1: 3.0}}, "class_guidance"),
        ({"guidance_interval": (2.0, 45.0)}, "guidance_interval"),
        ({"seed": 7}, "seed"),
    ],
)
def test_a_folder_with_another_export_refuses_other_settings(tmp_path, model, masks, change, words):
    export_pairs(masks[:1], model, tmp_path, SETTINGS)
    before = _files(tmp_path)
    other = SamplerSettings(**{**SETTINGS.__dict__, **change})
    with pytest.raises(ExportError, match=f"other settings \\({words} differ"):
        export_pairs(masks, model, tmp_path, other)
    assert _files(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "value", "recorded", "default"),
    [("class_guidance", {1: 3.0}, "1=3", ""), ("guidance_interval", (2.0, 45.0), "2,45", "all")],
)
def test_a_setting_is_recorded_and_a_manifest_from_before_its_column_resumes(
    tmp_path, model, masks, field, value, recorded, default
):
    changed = SamplerSettings(**{**SETTINGS.__dict__, field: value})
    export_pairs(masks[:1], model, tmp_path / "a", changed)
    assert {row[field] for row in _rows(tmp_path / "a")} == {recorded}
    # A manifest written before the setting existed has no such column: it was made with the default.
    export_pairs(masks[:1], model, tmp_path / "b", SETTINGS)
    rows = _rows(tmp_path / "b")
    assert rows[0][field] == default
    old_fields = [f for f in MANIFEST_FIELDS if f != field]
    with open(tmp_path / "b" / MANIFEST, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = export_pairs(masks, model, tmp_path / "b", SETTINGS)
    assert (summary.written, summary.skipped) == (2, 1)
    with pytest.raises(ExportError, match=f"{field} differ"):
        export_pairs(masks, model, tmp_path / "b", changed)


def test_other_pair_numbering_is_refused(tmp_path, model, masks):
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    with pytest.raises(ExportError, match="samples per mask"):
        export_pairs(masks[:2], model, tmp_path, SETTINGS, samples_per_mask=2)


def test_bad_masks_and_ranks_are_refused_before_writing(tmp_path, model):
    bad = masks_from_arrays({"too many classes": np.full((8, 8), 5, np.uint8)})
    with pytest.raises(ValueError, match="too many classes"):
        export_pairs(bad, model, tmp_path / "out", SETTINGS)
    assert not list((tmp_path / "out").rglob("*.tif")) and not (tmp_path / "out" / MANIFEST).exists()
    with pytest.raises(ValueError, match="rank"):
        export_pairs([], model, tmp_path / "out", SETTINGS, rank=2, world_size=2)


def test_ranks_together_make_the_pairs_of_one_process(tmp_path, model, masks):
    export_pairs(masks, model, tmp_path / "one", SETTINGS, samples_per_mask=2)
    shared = tmp_path / "two"
    summaries = [export_pairs(masks, model, shared, SETTINGS, samples_per_mask=2, rank=r, world_size=2) for r in (0, 1)]
    assert [s.written for s in summaries] == [3, 3]
    assert not (shared / MANIFEST).exists()
    assert sorted(p.name for p in shared.glob("manifest.rank*.csv")) == ["manifest.rank0.csv", "manifest.rank1.csv"]
    assert len(finished_pairs(shared)) == 6  # resume sees every rank's rows
    assert merge_manifests(shared) == shared / MANIFEST
    assert not list(shared.glob("manifest.rank*.csv"))
    assert _files(shared) == _files(tmp_path / "one")
    assert (shared / MANIFEST).read_bytes() == (tmp_path / "one" / MANIFEST).read_bytes()


def test_one_process_finishes_and_merges_an_unfinished_sharded_export(tmp_path, model, masks):
    export_pairs(masks, model, tmp_path, SETTINGS, rank=1, world_size=2)  # rank 0 never ran
    summary = export_pairs(masks, model, tmp_path, SETTINGS)
    assert (summary.written, summary.skipped) == (2, 1)
    assert [row["name"] for row in _rows(tmp_path)] == [f"random_{i:05d}_s000" for i in range(3)]
    assert not list(tmp_path.glob("manifest.rank*.csv"))


def test_preview_shows_mask_and_image_side_by_side(tmp_path, model, masks):
    export_pairs(masks, model, tmp_path, SETTINGS)
    path = write_preview(tmp_path, tmp_path / "preview.png", count=2)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    assert (height, width) == (2 * 16 + 2, 2 * 16 + 2)  # 2 pairs of 16x16 tiles with a 2 px gap
    with pytest.raises(ExportError, match="no finished pairs"):
        write_preview(tmp_path / "empty", tmp_path / "x.png")


def test_masks_from_arrays_and_folders(tmp_path):
    stack = np.zeros((2, 8, 8), np.uint8)
    items = masks_from_arrays({"my mask": stack, "flat": stack[0]})
    assert [item.name for item in items] == ["my_mask_z0000", "my_mask_z0001", "flat"]
    with pytest.raises(ValueError, match="4d"):
        masks_from_arrays({"4d": np.zeros((1, 1, 4, 4))})
    (tmp_path / "masks").mkdir()
    for name in ("b", "a"):
        tifffile.imwrite(tmp_path / "masks" / f"{name}.tif", stack[0])
    assert [item.name for item in masks_from_folder(tmp_path)] == ["a", "b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no \.tif"):
        masks_from_folder(tmp_path / "empty")


def _rewrite_manifest(folder, rows):
    with open(folder / MANIFEST, "w", newline="") as file:  # as if killed before the later rows were appended
        writer = csv.DictWriter(file, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def test_a_crash_between_files_and_row_resumes_with_several_samples_per_mask(tmp_path, model, masks):
    # One batch made samples 0-2; the resumed run makes sample 2 alone, and a batch of another size gives images
    # that differ in the last bits: the unrecorded sample 1 is recorded from the provenance stored in its TIFF.
    settings = SamplerSettings(**{**SETTINGS.__dict__, "batch_size": 4})
    export_pairs(masks[:1], model, tmp_path, settings, samples_per_mask=3)
    rows = _rows(tmp_path)
    _rewrite_manifest(tmp_path, rows[:1])
    for kind in ("images", "masks"):
        (tmp_path / kind / "random_00000_s002.tif").unlink()
    orphan = tmp_path / rows[1]["image"]
    before, stamp = orphan.read_bytes(), orphan.stat().st_mtime_ns
    summary = export_pairs(masks[:1], model, tmp_path, settings, samples_per_mask=3)
    assert (summary.written, summary.skipped, summary.cancelled) == (1, 2, False)
    assert orphan.read_bytes() == before and orphan.stat().st_mtime_ns == stamp
    assert _rows(tmp_path) == rows


def test_exported_tiffs_carry_their_provenance_for_tifffile_and_imagej(tmp_path, model, masks):
    export_pairs(masks[:1], model, tmp_path, SETTINGS)
    row = _rows(tmp_path)[0]
    for kind in ("image", "mask"):
        with tifffile.TiffFile(tmp_path / row[kind]) as tif:
            metadata = tif.imagej_metadata
        stored = json.loads(metadata["Info"])  # ImageJ shows it in Image > Show Info
        assert {field: str(stored[field]) for field in MANIFEST_FIELDS} == row
        assert len(stored["mask_sha256"]) == 64
        assert metadata["unit"] == "um"
        assert read_pixel_size_nm(tmp_path / row[kind]) == pytest.approx(60.0)


def test_an_unrecorded_file_with_another_pairs_provenance_is_refused(tmp_path, model, masks):
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    rows = _rows(tmp_path)
    _rewrite_manifest(tmp_path, rows[:1])
    image = tmp_path / rows[1]["image"]
    image.write_bytes((tmp_path / rows[0]["image"]).read_bytes())  # pair 0's image under pair 1's name
    before = image.read_bytes()
    with pytest.raises(ExportError, match=r"random_00001_s000\.tif exists.*provenance is not this pair's"):
        export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert image.read_bytes() == before


def test_a_second_export_into_a_folder_being_written_is_refused(tmp_path, model, masks):
    started, release = threading.Event(), threading.Event()

    def wait_in_the_first_step(progress):
        started.set()
        release.wait(10)

    first = threading.Thread(
        target=export_pairs, args=(masks, model, tmp_path, SETTINGS), kwargs={"callback": wait_in_the_first_step}
    )
    first.start()
    try:
        assert started.wait(30)
        with pytest.raises(ExportError, match=f"another export is writing to {re.escape(str(tmp_path))}"):
            export_pairs(masks, model, tmp_path, SETTINGS)
    finally:
        release.set()
        first.join()
    assert [row["name"] for row in _rows(tmp_path)] == [f"random_{i:05d}_s000" for i in range(3)]


def test_a_row_cut_short_never_stays_beside_the_new_one(tmp_path, model, masks):
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    text = (tmp_path / MANIFEST).read_text()
    lines = text.splitlines(keepends=True)
    (tmp_path / MANIFEST).write_text("".join(lines[:2]) + lines[2][:-4])  # the last row cut inside its last cell
    assert list(finished_pairs(tmp_path)) == ["random_00000_s000"]
    summary = export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert (summary.written, summary.skipped) == (0, 2)  # the files were there: recorded again
    assert (tmp_path / MANIFEST).read_text() == text


def test_a_foreign_or_linked_manifest_is_refused_and_left_alone(tmp_path, model, masks):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / MANIFEST).write_text("id,score\n1,2\n")
    with pytest.raises(ExportError, match=r"manifest\.csv is not a manifest of iscat-diffusion export"):
        export_pairs(masks, model, tmp_path / "a", SETTINGS)
    assert (tmp_path / "a" / MANIFEST).read_text() == "id,score\n1,2\n"
    assert not list((tmp_path / "a").rglob("*.tif"))
    (tmp_path / "b").mkdir()
    target = tmp_path / "elsewhere.csv"
    target.write_text(",".join(MANIFEST_FIELDS) + "\n")
    (tmp_path / "b" / MANIFEST).symlink_to(target)
    with pytest.raises(ExportError, match="is a symbolic link"):
        export_pairs(masks, model, tmp_path / "b", SETTINGS)
    assert target.read_text() == ",".join(MANIFEST_FIELDS) + "\n"


def test_an_output_file_that_is_a_link_is_refused(tmp_path, model, masks):
    (tmp_path / "images").mkdir()
    target = tmp_path / "elsewhere.tif"
    tifffile.imwrite(target, np.ones((16, 16), np.float32))
    (tmp_path / "images" / "random_00000_s000.tif").symlink_to(target)
    before = target.read_bytes()
    with pytest.raises(ExportError, match=r"random_00000_s000\.tif is a symbolic link"):
        export_pairs(masks, model, tmp_path, SETTINGS)
    assert target.read_bytes() == before


def test_manifest_cells_are_neutralised_against_formula_injection(tmp_path, model, tiny_checkpoint):
    hostile = tmp_path / "=HYPERLINK(1).safetensors"
    shutil.copy(tiny_checkpoint, hostile)
    hostile_model = load_checkpoint(hostile)
    masks = masks_from_arrays({"-1+1": np.zeros((8, 8), np.uint8), "'quoted": np.zeros((8, 8), np.uint8)})
    folder = tmp_path / "out"
    export_pairs(masks, hostile_model, folder, SETTINGS)
    with open(folder / MANIFEST, newline="") as file:
        cells = [cell for record in csv.reader(file) for cell in record]
    assert "'=HYPERLINK(1).safetensors" in cells and "'-1_1_s000" in cells
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "@", "\t", "\r") or cell.startswith("-1_")]
    rows = finished_pairs(folder)  # read back as written
    assert sorted(rows) == ["-1_1_s000", "quoted_s000"]
    assert {row["checkpoint"] for row in rows.values()} == {hostile.name}
    summary = export_pairs(masks, hostile_model, folder, SETTINGS)
    assert (summary.written, summary.skipped) == (0, 2)


def test_random_masks_are_made_one_at_a_time_in_memory_independent_of_their_number():
    def peak_while_iterating(n):
        tracemalloc.start()
        masks = random_masks(n, (64, 64), particles=4, class_proportions=(1, 1), seed=3)
        for item in masks:
            assert item.mask.shape == (64, 64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    few, many = peak_while_iterating(10), peak_while_iterating(1000)
    assert many < few + 200_000  # a list of 1000 masks of 64x64 alone holds 4 MB


def test_random_masks_follow_one_generator_as_before_in_any_order():
    rng = np.random.default_rng(5)
    expected = [
        random_mask((16, 16), 4, min_distance=8, class_proportions=(1, 1), radius=3, rng=rng).mask for _ in range(4)
    ]
    masks = random_masks(4, (16, 16), particles=4, class_proportions=(1, 1), seed=5)
    for index in (3, 1, 2, 0):
        np.testing.assert_array_equal(masks[index].mask, expected[index])
    assert [item.name for item in masks[1:3]] == ["random_00001", "random_00002"]


def test_export_holds_one_batch_of_masks_and_images_at_a_time(tmp_path, model, masks, monkeypatch):
    batches = []

    def record(stack, model, *, seed, **kwargs):
        batches.append(len(stack))
        return np.zeros(stack.shape, np.float32)

    monkeypatch.setattr(pairs, "generate", record)
    settings = SamplerSettings(**{**SETTINGS.__dict__, "batch_size": 2})
    summary = export_pairs(masks[:1], model, tmp_path, settings, samples_per_mask=5)
    assert summary.written == 5 and batches == [2, 2, 1]


def test_export_memory_does_not_grow_with_the_number_of_pairs(tmp_path, model, monkeypatch):
    monkeypatch.setattr(pairs, "generate", lambda stack, *args, **kwargs: np.zeros(stack.shape, np.float32))

    def peak_of_export(n):
        tracemalloc.start()
        masks = random_masks(n, (96, 96), particles=4, class_proportions=(1, 1), seed=2)
        export_pairs(masks, model, tmp_path / str(n), SETTINGS)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    few, many = peak_of_export(5), peak_of_export(150)
    assert many < few + 600_000  # holding 150 masks of 96x96 as int64 would take 11 MB


def test_a_bad_mask_stops_the_export_before_its_pair(tmp_path, model, masks):
    items = [*masks[:1], *masks_from_arrays({"too many classes": np.full((16, 16), 5, np.uint8)}), *masks[1:2]]
    with pytest.raises(ValueError, match="too many classes"):
        export_pairs(items, model, tmp_path, SETTINGS)
    assert sorted(_files(tmp_path)) == ["images/random_00000_s000.tif", "masks/random_00000_s000.tif"]


def test_names_that_collide_after_cleaning_are_refused_before_any_work(tmp_path):
    for name in ("a b", "a_b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ExportError, match=r"a b\.tif and .*a_b\.tif both give pairs named 'a_b'"):
        masks_from_folder(tmp_path)
    with pytest.raises(ExportError, match="both give pairs named"):
        masks_from_arrays({"Cell": np.zeros((8, 8)), "cell": np.zeros((8, 8))})  # one file on Windows and macOS


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("con", "_con"),
        ("console", "console"),
        ("CON.part", "_CON.part"),
        ("nul.x.y", "_nul.x.y"),
        ("  ..a b..", "a_b"),
        ("é", "é"),
    ],
)
def test_safe_names_avoid_windows_devices(name, expected):
    assert safe_name(name) == expected


def test_a_long_mask_name_is_shortened_so_that_its_files_can_be_written(tmp_path, model):
    long = "x" * 240
    masks = masks_from_arrays({long: np.zeros((8, 8), np.uint8), long + "y": np.zeros((8, 8), np.uint8)})
    names = [item.name for item in masks]
    assert names[0] != names[1] and all(len(name.encode()) <= 200 for name in names)
    export_pairs(masks, model, tmp_path, SETTINGS)
    assert len(finished_pairs(tmp_path)) == 2


def test_output_paths_are_checked_before_any_work(tmp_path, model, masks):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        export_pairs(masks, model, tmp_path / "file", SETTINGS)
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "masks" / "m.tif", np.zeros((8, 8), np.uint8))
    for out in (tmp_path, tmp_path / "masks"):
        with pytest.raises(ExportError, match="where this export would write"):
            export_pairs(masks_from_folder(tmp_path), model, out, SETTINGS)
    assert not (tmp_path / "images").exists() and not list((tmp_path / "masks").iterdir())[1:]


def _fake_generate(stack, model, *, seed, **kwargs):
    """Images that depend only on the mask and the seed, made without torch (safe in a forked child)."""
    return np.stack([mask.astype(np.float32) * s + s for mask, s in zip(stack, seed, strict=True)])


def _export_counting_fsyncs(monkeypatch, folder, model, masks, settings, die_at=None):
    """Export with ``os.fsync`` counted; with ``die_at``, the process ends (``os._exit``) right after that sync."""
    calls = []
    real = os.fsync

    def counted(descriptor):
        real(descriptor)
        calls.append(1)
        if len(calls) == die_at:
            os._exit(9)

    monkeypatch.setattr(os, "fsync", counted)
    export_pairs(masks, model, folder, settings, samples_per_mask=2)
    monkeypatch.setattr(os, "fsync", real)
    return len(calls)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_an_export_killed_after_any_write_resumes_to_the_same_folder(tmp_path, model, masks, monkeypatch):
    monkeypatch.setattr(pairs, "generate", _fake_generate)
    settings = SamplerSettings(**{**SETTINGS.__dict__, "batch_size": 3})
    syncs = _export_counting_fsyncs(monkeypatch, tmp_path / "whole", model, masks, settings)
    expected = {name: tifffile.imread(tmp_path / "whole" / name) for name in _files(tmp_path / "whole")}
    for die_at in range(1, syncs + 1):  # after each file's data, each rename and each manifest row
        folder = tmp_path / f"killed{die_at}"
        child = os.fork()
        if child == 0:
            try:
                _export_counting_fsyncs(monkeypatch, folder, model, masks, settings, die_at)
            finally:
                os._exit(0)
        assert os.waitpid(child, 0)[1] != 0
        summary = export_pairs(masks, model, folder, settings, samples_per_mask=2)
        assert summary.written + summary.skipped == 6
        assert sorted(_files(folder)) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(tifffile.imread(folder / name), array, err_msg=f"{name} after {die_at}")
        assert (folder / MANIFEST).read_text() == (tmp_path / "whole" / MANIFEST).read_text()
        assert not [path for path in folder.rglob("*.tmp")]


def test_the_ranks_of_one_job_share_a_folder_and_everyone_else_is_kept_out(tmp_path):
    def refused(rank, world_size):
        with (
            pytest.raises(ExportError, match="another export is writing"),
            export_lock(tmp_path, rank, world_size),
        ):
            pass

    with export_lock(tmp_path, 0, 2):
        with export_lock(tmp_path, 1, 2):  # the other rank of the same torchrun job
            refused(0, 1)  # one process alone
            refused(1, 2)  # the same rank of a second job
        refused(0, 2)
    with export_lock(tmp_path, 0, 1):
        refused(1, 2)


def test_a_mask_file_name_that_is_not_utf8_is_recorded_with_escapes(tmp_path, model):
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(os.fsdecode(bytes(tmp_path / "masks") + b"/cell\xff.tif"), np.eye(16, dtype=np.uint8))
    export_pairs(masks_from_folder(tmp_path), model, tmp_path / "out", SETTINGS)
    [row] = _rows(tmp_path / "out")
    assert row["name"] == "cell_s000" and row["source_mask"].endswith("cell\\udcff.tif")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, which takes no new file")
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(model, masks):
    # /proc refuses new files even to root, who may write anywhere else (tests may run as root)
    with pytest.raises(OutputPathError, match="cannot write into folder /proc"):
        export_pairs(masks, model, Path("/proc/new/out"), SETTINGS)
