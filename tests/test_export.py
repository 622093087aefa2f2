"""Batch export core: pairs, manifest, resume, never overwriting, atomic files, settings checks, sharding, preview."""

import csv
import struct

import numpy as np
import pytest
import tifffile

from napari_iscat_diffusion import export
from napari_iscat_diffusion.diffusion import generate, load_checkpoint
from napari_iscat_diffusion.export import (
    MANIFEST,
    ExportError,
    export_pairs,
    finished_pairs,
    masks_from_arrays,
    masks_from_folder,
    merge_manifests,
    random_masks,
    write_preview,
)
from napari_iscat_diffusion.io.tiff_pairs import read_pixel_size_nm
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
        writer = csv.DictWriter(file, fieldnames=export.MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerow(rows[0])
    image = tmp_path / rows[1]["image"]
    stamp = image.stat().st_mtime_ns
    summary = export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert (summary.written, summary.skipped) == (1, 1)
    assert image.stat().st_mtime_ns == stamp
    assert _rows(tmp_path) == rows


def test_a_row_cut_short_by_a_crash_is_ignored(tmp_path, model, masks):
    export_pairs(masks[:1], model, tmp_path, SETTINGS)
    with open(tmp_path / MANIFEST, "a") as file:
        file.write("random_00001_s000,1,images/random_00001_s0")
    assert list(finished_pairs(tmp_path)) == ["random_00000_s000"]
    export_pairs(masks[:2], model, tmp_path, SETTINGS)
    assert [row["name"] for row in _rows(tmp_path) if row["seed"]] == ["random_00000_s000", "random_00001_s000"]


def test_files_are_written_atomically(tmp_path, model, masks, monkeypatch):
    real = tifffile.imwrite
    calls = []

    def crash_on_the_fourth_file(handle, array, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the second pair's image: write half of it, then fail
            handle.write(b"II*\x00half a tiff")
            raise OSError("disk full")
        real(handle, array, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", crash_on_the_fourth_file)
    with pytest.raises(OSError, match="disk full"):
        export_pairs(masks, model, tmp_path, SETTINGS)
    written = ["images/random_00000_s000.tif", "masks/random_00000_s000.tif", "masks/random_00001_s000.tif"]
    assert sorted(_files(tmp_path)) == written
    assert not [path for path in tmp_path.rglob("*") if path.name.endswith(".tmp")]
    monkeypatch.setattr(tifffile, "imwrite", real)
    summary = export_pairs(masks, model, tmp_path, SETTINGS)  # the recorded mask is kept: it is this pair's mask
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
    old_fields = [f for f in export.MANIFEST_FIELDS if f != field]
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
    assert not (tmp_path / "out").exists()
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
