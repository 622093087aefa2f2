"""TIFF pairs and HDF5 patches on disk: finding pairs, reading, atomic writing, pixel sizes."""

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_iscat_diffusion.io import tiff_pairs
from napari_iscat_diffusion.io.hdf5_patches import import_h5py, labels_from_class_masks
from napari_iscat_diffusion.io.tiff_pairs import (
    DataError,
    ImageMaskPair,
    find_pairs,
    read_image,
    read_mask,
    read_pixel_size_nm,
    write_tiff,
)


def _touch_tiff(path: Path, array=None, photometric="minisblack") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.zeros((4, 5), np.uint8) if array is None else array, photometric=photometric)
    return path


# --- find_pairs ---------------------------------------------------------------------------------------------


def test_images_and_masks_folders_with_every_mask_name(tmp_path):
    _touch_tiff(tmp_path / "images" / "a.tif")
    _touch_tiff(tmp_path / "images" / "b.tiff")
    _touch_tiff(tmp_path / "images" / "c.tif")
    _touch_tiff(tmp_path / "images" / "d.tif")
    _touch_tiff(tmp_path / "masks" / "a.tif")
    _touch_tiff(tmp_path / "masks" / "b_mask.tif")
    _touch_tiff(tmp_path / "masks" / "c_gt.tiff")
    _touch_tiff(tmp_path / "masks" / "zzz.tif")
    listing = find_pairs(tmp_path)
    assert listing.pairs == [
        ImageMaskPair("a", tmp_path / "images" / "a.tif", tmp_path / "masks" / "a.tif", None),
        ImageMaskPair("b", tmp_path / "images" / "b.tiff", tmp_path / "masks" / "b_mask.tif", None),
        ImageMaskPair("c", tmp_path / "images" / "c.tif", tmp_path / "masks" / "c_gt.tiff", None),
        ImageMaskPair("d", tmp_path / "images" / "d.tif", None, None),
    ]
    assert listing.unmatched_masks == [tmp_path / "masks" / "zzz.tif"]


def test_flat_folder(tmp_path):
    for name in ("x.tif", "x_mask.tif", "y.TIF", "y_gt.tif", "z.tif", "orphan_gt.tif"):
        _touch_tiff(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._x.tif").write_bytes(b"macOS resource fork")
    listing = find_pairs(tmp_path)
    assert [(p.name, p.mask.name if p.mask else None) for p in listing.pairs] == [
        ("x", "x_mask.tif"),
        ("y", "y_gt.tif"),
        ("z", None),
    ]
    assert listing.unmatched_masks == [tmp_path / "orphan_gt.tif"]


def test_train_val_split_each_with_its_own_layout(tmp_path):
    _touch_tiff(tmp_path / "train" / "images" / "a.tif")
    _touch_tiff(tmp_path / "train" / "masks" / "a_mask.tif")
    _touch_tiff(tmp_path / "train" / "images" / "b.tif")
    _touch_tiff(tmp_path / "train" / "masks" / "b_mask.tif")
    _touch_tiff(tmp_path / "val" / "a.tif")  # the same name in another split is fine
    _touch_tiff(tmp_path / "val" / "a_gt.tif")
    _touch_tiff(tmp_path / "stray.tif")  # ignored: the splits define the dataset
    listing = find_pairs(tmp_path)
    assert [(p.split, p.name, p.mask.name) for p in listing.pairs] == [
        ("train", "a", "a_mask.tif"),
        ("train", "b", "b_mask.tif"),
        ("val", "a", "a_gt.tif"),
    ]
    assert listing.unmatched_masks == []


def test_find_pairs_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"missing: folder not found"):
        find_pairs(tmp_path / "missing")
    with pytest.raises(DataError, match="no TIFF images found"):
        find_pairs(tmp_path)
    _touch_tiff(tmp_path / "images" / "a.tif")
    _touch_tiff(tmp_path / "masks" / "a.tif")
    _touch_tiff(tmp_path / "masks" / "a_gt.tif")
    with pytest.raises(DataError, match=r"a\.tif: ambiguous masks: a\.tif and a_gt\.tif"):
        find_pairs(tmp_path)


def test_duplicate_stems_are_an_error(tmp_path):
    _touch_tiff(tmp_path / "a.tif")
    _touch_tiff(tmp_path / "a.tiff")
    with pytest.raises(DataError, match=r"a\.tiff: same name as a\.tif"):
        find_pairs(tmp_path)


# --- reading ------------------------------------------------------------------------------------------------


def test_read_image_keeps_values_and_gives_float32(tmp_path):
    data = np.arange(20, dtype=np.uint16).reshape(4, 5) * 1000
    image = read_image(_touch_tiff(tmp_path / "a.tif", data))
    assert image.dtype == np.float32 and image.shape == (4, 5)
    np.testing.assert_array_equal(image, data)


def test_read_image_stacks_and_singleton_axes(tmp_path):
    stack = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(read_image(_touch_tiff(tmp_path / "z.tif", stack)), stack)
    assert read_image(_touch_tiff(tmp_path / "one.tif", stack[:1])).shape == (4, 5)
    with pytest.raises(DataError, match=r"hyper\.tif: expected a 2-D image"):
        read_image(_touch_tiff(tmp_path / "hyper.tif", np.zeros((2, 3, 4, 5), np.float32)))


@pytest.mark.parametrize(
    ("array", "photometric", "kind"),
    [
        (np.zeros((4, 5, 3), np.uint8), "rgb", "an RGB image (3 samples per pixel)"),
        (np.zeros((4, 5, 4), np.uint8), "rgb", "an RGBA image (4 samples per pixel)"),
        (np.zeros((2, 4, 5, 3), np.uint8), "rgb", "an RGB image"),
        (np.zeros((4, 5, 2), np.float32), "minisblack", "a multi-channel image (2 samples per pixel)"),
    ],
)
def test_colour_files_are_refused_as_images_and_as_masks(tmp_path, array, photometric, kind):
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, array, photometric=photometric, planarconfig="contig")
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match=rf"colour\.tif: is {re.escape(kind)}.*save it as a single-channel"):
            reader(path)


def test_a_file_of_several_series_is_refused_naming_their_number(tmp_path):
    path = tmp_path / "series.tif"
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(np.ones((4, 5), np.uint8))
        tiff.write(np.zeros((8, 8), np.uint8))
        tiff.write(np.zeros((2, 2), np.uint8))
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match=r"series\.tif: holds 3 image series"):
            reader(path)


def _claiming(path: Path, height: int, width: int, dtype=np.uint8) -> Path:
    """A TIFF file of a few hundred bytes whose header claims ``height`` x ``width`` pixels."""
    tifffile.imwrite(path, np.zeros((16, 16), dtype), metadata=None)
    with tifffile.TiffFile(path) as tif:
        offsets = [tif.pages[0].tags[code].valueoffset for code in (256, 257)]  # ImageWidth, ImageLength
    data = bytearray(path.read_bytes())
    for offset, value in zip(offsets, (width, height), strict=True):
        data[offset : offset + 4] = value.to_bytes(4, "little")
    path.write_bytes(data)
    return path


def test_a_header_claiming_gigabytes_is_refused_before_reading_pixels(tmp_path, monkeypatch):
    path = _claiming(tmp_path / "huge.tif", 100_000, 100_000)
    assert path.stat().st_size < 1000

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels were read")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", no_pixels)
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match=r"huge\.tif: claims 100000 x 100000 uint8 pixels \(9\.3 GiB\), more than"):
            reader(path)


def test_folders_and_special_files_are_named_as_such(tmp_path):
    for reader in (read_image, read_mask):
        with pytest.raises(DataError, match=r"is a folder; expected a TIFF file"):
            reader(tmp_path)
    if sys.platform != "win32":
        os.mkfifo(tmp_path / "pipe.tif")
        with pytest.raises(DataError, match=r"pipe\.tif: is not a regular file"):
            read_mask(tmp_path / "pipe.tif")


def test_corrupt_or_missing_files_raise_data_error_naming_them(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a TIFF file at all" * 10)
    for reader in (read_image, read_mask, read_pixel_size_nm):
        with pytest.raises(DataError, match=r"bad\.tif: not a readable TIFF"):
            reader(bad)
        with pytest.raises(DataError, match=r"gone\.tif: file not found"):
            reader(tmp_path / "gone.tif")


def test_read_mask_dtypes(tmp_path):
    labels = np.array([[0, 1], [2, 3]])
    np.testing.assert_array_equal(read_mask(_touch_tiff(tmp_path / "u8.tif", labels.astype(np.uint8))), labels)
    from_float = read_mask(_touch_tiff(tmp_path / "f.tif", labels.astype(np.float32)))
    assert from_float.dtype == np.uint8
    np.testing.assert_array_equal(from_float, labels)
    big = read_mask(_touch_tiff(tmp_path / "big.tif", np.array([[0, 300]], np.float32)))
    assert big.dtype == np.uint16 and big[0, 1] == 300
    assert read_mask(_touch_tiff(tmp_path / "b.tif", labels.astype(bool))).dtype == np.uint8


@pytest.mark.parametrize(
    ("array", "photometric", "match"),
    [
        (np.array([[0.0, 0.5]], np.float32), "minisblack", "not labels"),
        (np.array([[0.0, np.nan]], np.float32), "minisblack", "not labels"),
        (np.array([[0.0, 1e300]], np.float64), "minisblack", "not labels"),
        (np.array([[0, -1]], np.int16), "minisblack", "negative label"),
        (np.zeros((4, 5, 3), np.uint8), "rgb", "RGB"),
        (np.zeros((2, 4, 5), np.uint8), "minisblack", "expected a 2-D label image"),
    ],
)
def test_read_mask_rejects_non_label_files(tmp_path, array, photometric, match):
    path = _touch_tiff(tmp_path / "m.tif", array, photometric)
    with pytest.raises(DataError, match=match) as info:
        read_mask(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_data_error_is_a_value_error_and_pickles():
    error = DataError(Path("x/y.tif"), "broken")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.problem, str(copy)) == (Path("x/y.tif"), "broken", str(error))


# --- writing ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "dtype"),
    [
        (np.random.default_rng(0).normal(size=(6, 7)).astype(np.float32), np.float32),
        (np.random.default_rng(0).normal(size=(2, 6, 7)), np.float32),  # float64 is stored as float32
        (np.arange(42).reshape(6, 7), np.uint8),
        (np.arange(42).reshape(6, 7) * 1000, np.uint16),
        (np.arange(42).reshape(6, 7) - 5, np.float32),  # negative integers
        (np.eye(6, 7, dtype=bool), np.uint8),
    ],
)
def test_write_tiff_round_trip(tmp_path, array, dtype):
    path = tmp_path / "out.tif"
    write_tiff(path, array)
    stored = tifffile.imread(path)
    assert stored.dtype == dtype
    np.testing.assert_allclose(stored, array.astype(dtype), rtol=0)


def test_write_tiff_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "out.tif"
    write_tiff(path, np.zeros((3, 3), np.uint8))
    with pytest.raises(FileExistsError, match=r"out\.tif already exists"):
        write_tiff(path, np.ones((3, 3), np.uint8))
    assert not tifffile.imread(path).any()
    write_tiff(path, np.ones((3, 3), np.uint8), overwrite=True)
    assert tifffile.imread(path).all()
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_write_tiff_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.tif"
    write_tiff(path, np.full((8, 8), 7, np.uint8))

    def fail_half_way(handle, *args, **kwargs):
        handle.write(b"II*\x00 half a tiff")
        raise OSError("disk full")

    monkeypatch.setattr(tiff_pairs.tifffile, "imwrite", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(path, np.zeros((8, 8), np.uint8), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(tmp_path / "new.tif", np.zeros((8, 8), np.uint8))
    monkeypatch.undo()
    np.testing.assert_array_equal(tifffile.imread(path), 7)  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]  # no temporary file and no half-written new.tif


def test_write_tiff_rejects_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_tiff(tmp_path / "no" / "such" / "x.tif", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="pixel_size_nm"):
        write_tiff(tmp_path / "x.tif", np.zeros((2, 2)), pixel_size_nm=0)
    with pytest.raises(ValueError, match="shape"):
        write_tiff(tmp_path / "x.tif", np.zeros(4))
    with pytest.raises(ValueError, match="complex"):
        write_tiff(tmp_path / "x.tif", np.zeros((2, 2), complex))


@pytest.mark.parametrize("pixel_size_nm", [65.0, 117.3, 5.5, 1000.0])
def test_pixel_size_round_trip(tmp_path, pixel_size_nm):
    path = tmp_path / "px.tif"
    write_tiff(path, np.zeros((2, 4, 5), np.float32), pixel_size_nm=pixel_size_nm)
    assert read_pixel_size_nm(path) == pytest.approx(pixel_size_nm, rel=1e-6)
    with tifffile.TiffFile(path) as tif:  # what ImageJ reads: pixels per µm, unit in the description
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        x_resolution = tif.pages[0].tags["XResolution"].value
        assert x_resolution[0] / x_resolution[1] == pytest.approx(1000 / pixel_size_nm, rel=1e-6)


def test_pixel_size_from_other_writers(tmp_path):
    assert read_pixel_size_nm(_touch_tiff(tmp_path / "plain.tif")) is None
    path = tmp_path / "cm.tif"
    tifffile.imwrite(path, np.zeros((2, 2), np.uint8), resolution=(1e7 / 80, 1e7 / 80), resolutionunit="CENTIMETER")
    assert read_pixel_size_nm(path) == pytest.approx(80, rel=1e-6)
    path = tmp_path / "dpi.tif"
    tifffile.imwrite(path, np.zeros((2, 2), np.uint8), resolution=(72, 72), resolutionunit="INCH")
    assert read_pixel_size_nm(path) is None  # a screen resolution, not a pixel size
    path = tmp_path / "micron.tif"
    tifffile.imwrite(path, np.zeros((2, 2), np.uint8), imagej=True, resolution=(10, 10), metadata={"unit": "micron"})
    assert read_pixel_size_nm(path) == pytest.approx(100)


# --- HDF5 class masks ---------------------------------------------------------------------------------------


def test_labels_from_class_masks_higher_class_wins():
    masks = np.zeros((3, 2, 3), np.uint8)
    masks[0, 0, :2] = 1
    masks[1, 0, 1:] = 1
    masks[2, 1, 2] = 255  # any nonzero value counts
    labels = labels_from_class_masks(masks)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[1, 2, 2], [0, 0, 3]])
    batch = labels_from_class_masks(np.stack([masks, np.zeros_like(masks)]))
    np.testing.assert_array_equal(batch, [labels, np.zeros_like(labels)])
    with pytest.raises(ValueError, match="C, H, W"):
        labels_from_class_masks(np.zeros((2, 2)))


def test_missing_h5py_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(ModuleNotFoundError, match="pip install h5py"):
        import_h5py()


def test_atomic_write_replaces_the_file_or_leaves_it_untouched(tmp_path):
    from napari_iscat_diffusion.io.atomic import atomic_open, atomic_write_text

    target = tmp_path / "report.json"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "w") as file:
        file.write("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left behind
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    with pytest.raises(ValueError, match="mode"):
        atomic_open(target, "a").__enter__()


def test_atomic_write_to_a_name_as_long_as_the_file_system_allows(tmp_path):
    from napari_iscat_diffusion.io.atomic import atomic_write_text, remove_stale_temporaries

    target = tmp_path / ("é" * 125 + ".tif")  # 254 bytes: the temporary file's longer name must still fit
    atomic_write_text(target, "written")
    assert target.read_text() == "written"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert remove_stale_temporaries(target) == []
