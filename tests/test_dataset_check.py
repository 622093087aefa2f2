"""`check_dataset`: every problem gives a clear message naming the file."""

from pathlib import Path

import numpy as np
import pytest

from napari_iscat_diffusion.io import dataset_check
from napari_iscat_diffusion.io.dataset_check import check_dataset
from napari_iscat_diffusion.io.tiff_pairs import DataError, write_tiff

h5py = pytest.importorskip("h5py")


def _mask(label: int = 1, size: int = 16) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[4:8, 4:8] = label
    return mask


def _image(size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, (size, size)).astype(np.float32)


def _pair(folder: Path, name: str, image=None, mask=None, mask_name: str | None = None) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    write_tiff(folder / "images" / f"{name}.tif", _image() if image is None else image, pixel_size_nm=65)
    write_tiff(folder / "masks" / (mask_name or f"{name}_mask.tif"), _mask() if mask is None else mask)


def _h5(path: Path, images: np.ndarray, masks: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["image_patches"] = images
        f["mask_patches"] = masks
    return path


def _patches(n: int = 6, classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(1).normal(size=(n, 2, 8, 8)).astype(np.float32)
    masks = np.zeros((n, classes, 8, 8), np.uint8)
    masks[:, 0, 1:3, 1:3] = 1
    masks[:, classes - 1, 5:7, 5:7] = 1
    return images, masks


# --- TIFF folders -------------------------------------------------------------------------------------------


def test_clean_split_dataset(tmp_path):
    _pair(tmp_path / "train", "a")
    _pair(tmp_path / "train", "b", mask=_mask(2), mask_name="b_gt.tif")
    _pair(tmp_path / "val", "c", mask=_mask(3), mask_name="c.tif")
    report = check_dataset(tmp_path, num_classes=3)
    assert report.ok and report.errors == [] and report.warnings == []
    assert dict(report.images_per_split) == {"train": 2, "val": 1}
    assert dict(report.masks_per_split) == {"train": 2, "val": 1}
    assert (report.num_images, report.num_masks) == (3, 3)
    assert dict(report.image_shapes) == {(16, 16): 3}
    assert dict(report.image_dtypes) == {"float32": 3} and dict(report.mask_dtypes) == {"uint8": 3}
    assert dict(report.pixel_sizes_nm) == {65.0: 3}
    assert dict(report.label_pixels) == {0: 3 * (256 - 16), 1: 16, 2: 16, 3: 16}
    assert report.image_range[0] < 0 < report.image_range[1]
    text = report.format()
    assert "train" in text and "val" in text and "total" in text and "65 nm (3)" in text
    assert text.splitlines()[-1] == "OK"


def test_unmatched_names_both_ways(tmp_path):
    _pair(tmp_path, "a")
    write_tiff(tmp_path / "images" / "lonely.tif", _image(), pixel_size_nm=65)
    write_tiff(tmp_path / "masks" / "stray_mask.tif", _mask())
    report = check_dataset(tmp_path)
    assert report.ok
    assert report.warnings == ["images/lonely.tif: no mask found", "masks/stray_mask.tif: mask without an image"]
    assert (report.num_images, report.num_masks) == (2, 1)


def test_corrupt_files_are_errors_naming_them(tmp_path):
    _pair(tmp_path, "good")
    _pair(tmp_path, "bad_mask")
    _pair(tmp_path, "bad_image")
    (tmp_path / "images" / "bad_image.tif").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "masks" / "bad_mask_mask.tif").write_bytes(b"\x00garbage" * 50)
    report = check_dataset(tmp_path)
    assert not report.ok
    assert len(report.errors) == 2
    assert report.errors[0].startswith("images/bad_image.tif: not a readable TIFF file")
    assert report.errors[1].startswith("masks/bad_mask_mask.tif: not a readable TIFF file")


def test_image_and_mask_of_different_sizes(tmp_path):
    _pair(tmp_path, "a", mask=_mask(size=12))
    report = check_dataset(tmp_path)
    assert report.errors == [
        "masks/a_mask.tif: mask is 12x12 pixels but its image images/a.tif is 16x16; they must be the same size"
    ]


def test_labels_above_num_classes(tmp_path):
    mask = _mask(1)
    mask[10:12, 10:12] = 4
    mask[0, 0] = 7
    _pair(tmp_path, "a", mask=mask)
    assert check_dataset(tmp_path).ok
    report = check_dataset(tmp_path, num_classes=3)
    assert report.errors == ["masks/a_mask.tif: labels 4, 7 above num_classes=3"]


def test_nan_and_inf_in_images(tmp_path):
    image = _image()
    image[0, :3] = np.nan
    image[1, 0] = np.inf
    _pair(tmp_path, "a", image=image)
    report = check_dataset(tmp_path)
    assert report.errors == ["images/a.tif: 3 NaN and 1 Inf pixels"]
    assert np.isfinite(report.image_range).all()


def test_absurd_values_are_errors_by_the_rules_training_uses(tmp_path):
    # pixel_values: one error per file, a huge magnitude first, else a pixel far outside the data's spread.
    outlier, huge = _image(seed=1), _image(seed=2)
    outlier[3, 3], huge[4, 4] = 1e6, 3e38
    for name, image in (("a", _image()), ("b", outlier), ("c", huge), ("d", _image(seed=3))):
        _pair(tmp_path, name, image=image)
    errors = check_dataset(tmp_path).errors
    assert len(errors) == 2
    assert errors[0] == "images/c.tif: a pixel of magnitude 3e+38, above 1e+18 (too large for float32 arithmetic)"
    assert errors[1].startswith("images/b.tif: a pixel of 1e+06 lies 1.14e+08 robust spreads from the data")


def test_raw_camera_counts_with_a_saturated_pixel_pass(tmp_path):
    counts = np.random.default_rng(0).poisson(1000, (2, 16, 16)).astype(np.uint16)
    counts[0, 5, 5] = 65535  # about 2000 spreads above a background of 1000 +- 32 counts
    _pair(tmp_path, "a", image=counts[0])
    _pair(tmp_path, "b", image=counts[1])
    assert check_dataset(tmp_path).ok


def test_hdf5_patches_get_the_same_value_rules(tmp_path):
    images, masks = _patches()
    images[4, 1, 2, 2] = 1e9
    report = check_dataset(_h5(tmp_path / "data.h5", images, masks))
    assert len(report.errors) == 1 and report.errors[0].startswith("data.h5: image_patches[4]: a pixel of 1e+09 lies")


def test_empty_masks_are_warnings(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", mask=np.zeros((16, 16), np.uint8))
    report = check_dataset(tmp_path)
    assert report.ok
    assert report.warnings == ["masks/b_mask.tif: empty mask (all background)"]


def test_non_label_masks_are_errors(tmp_path):
    _pair(tmp_path, "a", mask=np.full((16, 16), 0.5, np.float32))
    report = check_dataset(tmp_path)
    assert len(report.errors) == 1 and report.errors[0].startswith("masks/a_mask.tif: float32 mask with values")


def test_mixed_dtypes_planes_and_pixel_sizes(tmp_path):
    _pair(tmp_path, "a")
    _pair(tmp_path, "b", image=(np.arange(256).reshape(16, 16) % 3).astype(np.uint16))  # values in the others' range
    _pair(tmp_path, "c", image=np.stack([_image(), _image(seed=1)]))
    write_tiff(tmp_path / "images" / "d.tif", _image(), pixel_size_nm=100)
    write_tiff(tmp_path / "masks" / "d_mask.tif", _mask())
    write_tiff(tmp_path / "images" / "e.tif", _image())
    write_tiff(tmp_path / "masks" / "e_mask.tif", _mask())
    report = check_dataset(tmp_path)
    assert report.errors == [
        "images have different numbers of planes (Z): 1 (4 files, e.g. images/a.tif), "
        "2 (1 file, e.g. images/c.tif); a model takes a fixed number of image channels"
    ]
    assert report.warnings == [
        "image dtypes differ: float32 (4 files, e.g. images/a.tif), uint8 (1 file, e.g. images/b.tif)",
        "images have different pixel sizes: 65 nm (3 files, e.g. images/a.tif), 100 nm (1 file, e.g. images/d.tif), "
        "not stored (1 file, e.g. images/e.tif)",
    ]


def test_no_images_or_no_masks(tmp_path):
    report = check_dataset(tmp_path)
    assert not report.ok and "no TIFF images found" in report.errors[0]
    assert report.format().splitlines()[-1] == "FAILED: 1 error"
    write_tiff(tmp_path / "a.tif", _image())
    report = check_dataset(tmp_path)
    assert report.errors == [f"{tmp_path}: no image has a mask"]


def test_format_lists_every_problem_on_its_own_line(tmp_path):
    _pair(tmp_path, "a", mask=_mask(5))
    _pair(tmp_path, "b", mask=np.zeros((16, 16), np.uint8))
    text = check_dataset(tmp_path, num_classes=2).format()
    assert "  ERROR: masks/a_mask.tif: labels 5 above num_classes=2" in text.splitlines()
    assert "  WARNING: masks/b_mask.tif: empty mask (all background)" in text.splitlines()
    assert text.splitlines()[-1] == "FAILED: 1 error"


# --- HDF5 ---------------------------------------------------------------------------------------------------


def test_clean_hdf5(tmp_path):
    path = _h5(tmp_path / "data.h5", *_patches())
    report = check_dataset(path, num_classes=2)
    assert report.ok and report.warnings == []
    assert (report.num_images, report.num_masks, report.kind) == (6, 6, "HDF5 file")
    assert dict(report.image_shapes) == {(2, 8, 8): 6}
    assert dict(report.label_pixels) == {0: 6 * 56, 1: 24, 2: 24}
    assert report.format().splitlines()[-1] == "OK"


def test_hdf5_problems_name_file_and_patch(tmp_path):
    images, masks = _patches(classes=3)
    images[2, 1, 0, 0] = np.nan
    masks[4] = 0
    masks[1, 0, 5, 5] = 1  # overlaps class 3 there: class 3 wins
    masks[3, 0, 0, 0] = 255
    path = _h5(tmp_path / "data.hdf5", images, masks)
    report = check_dataset(path, num_classes=2)
    assert report.errors == [
        "data.hdf5: image_patches[2] has 1 NaN and 0 Inf pixels",
        "data.hdf5: mask_patches has pixels of classes 3 above num_classes=2",
    ]
    assert report.warnings == [
        "data.hdf5: mask_patches[4] is empty (all background)",
        "data.hdf5: mask_patches holds values other than 0 and 1 in 1 patches (first: 3); "
        "any nonzero value counts as the class",
        "data.hdf5: class masks overlap in 1 patches (first: 1); the higher class wins",
    ]


def test_hdf5_chunks_give_the_same_report(tmp_path, monkeypatch):
    images, masks = _patches(n=7)
    images[5, 0, 0, 0] = np.inf
    masks[6] = 0
    path = _h5(tmp_path / "data.h5", images, masks)
    whole = check_dataset(path)
    monkeypatch.setattr(dataset_check, "_CHUNK_BYTES", 1)  # one patch at a time
    chunked = check_dataset(path)
    assert chunked.errors == whole.errors == ["data.h5: image_patches[5] has 0 NaN and 1 Inf pixels"]
    assert chunked.warnings == whole.warnings == ["data.h5: mask_patches[6] is empty (all background)"]
    assert chunked.label_pixels == whole.label_pixels and chunked.image_range == whole.image_range


@pytest.mark.parametrize(
    ("datasets", "message"),
    [
        ({"images": np.zeros((2, 1, 4, 4))}, "no dataset image_patches or mask_patches (found: images)"),
        ({"image_patches": np.zeros((2, 4, 4)), "mask_patches": np.zeros((2, 1, 4, 4))}, "expected (N, Z, H, W)"),
        ({"image_patches": np.zeros((2, 1, 4, 4)), "mask_patches": np.zeros((3, 1, 4, 4))}, "differ in N, H or W"),
        ({"image_patches": np.zeros((2, 1, 4, 4)), "mask_patches": np.zeros((2, 1, 4, 5))}, "differ in N, H or W"),
    ],
)
def test_hdf5_layout_errors(tmp_path, datasets, message):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    report = check_dataset(path)
    assert len(report.errors) == 1 and report.errors[0].startswith("bad.h5: ") and message in report.errors[0]


def _hostile_hdf5(path: Path, kind: str) -> Path:
    """An HDF5 file of a few kB whose datasets are of the wrong kind, link elsewhere or claim huge sizes."""
    with h5py.File(path, "w") as f:
        f["mask_patches"] = np.zeros((2, 1, 4, 4), np.uint8)
        if kind == "text":
            f["image_patches"] = np.full((2, 1, 4, 4), b"a", "S1")
        elif kind == "complex":
            f["image_patches"] = np.zeros((2, 1, 4, 4), np.complex64)
        elif kind == "group":
            f.create_group("image_patches")
        elif kind == "external link":
            f["image_patches"] = h5py.ExternalLink(str(path.with_name("nowhere.h5")), "/data")
        elif kind == "huge patches":  # chunks never written take no space: 2 x 14 GB in a 2 kB file
            del f["mask_patches"]
            f.create_dataset("image_patches", shape=(2, 1, 60000, 60000), dtype="f4", chunks=(1, 1, 1024, 1024))
            f.create_dataset("mask_patches", shape=(2, 1, 60000, 60000), dtype="u1", chunks=(1, 1, 1024, 1024))
        else:  # more classes than a label image holds
            del f["mask_patches"]
            f["image_patches"] = np.zeros((2, 1, 4, 4), np.float32)
            f.create_dataset("mask_patches", shape=(2, 70000, 4, 4), dtype="u1", chunks=(1, 1, 4, 4))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "image_patches holds |S1 values; expected numbers"),
        ("complex", "image_patches holds complex64 values; expected numbers"),
        ("group", "image_patches is not a dataset"),
        ("external link", "cannot open image_patches"),
        ("huge patches", "one patch of image_patches and mask_patches is 16.8 GiB, more than the 4 GiB"),
        ("many classes", "mask_patches has 70000 classes, more than 255"),
    ],
)
def test_hostile_hdf5_files_are_refused_before_their_patches_are_read(tmp_path, kind, message):
    report = check_dataset(_hostile_hdf5(tmp_path / "bad.h5", kind))
    assert len(report.errors) == 1 and report.errors[0].startswith("bad.h5: ") and message in report.errors[0]


def test_corrupt_hdf5(tmp_path):
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not hdf5" * 100)
    report = check_dataset(path)
    assert len(report.errors) == 1 and report.errors[0].startswith("broken.h5: not a readable HDF5 file")


# --- arguments ----------------------------------------------------------------------------------------------


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(DataError, match="nowhere: not found"):
        check_dataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: expected a folder of TIFF pairs or an \.h5/\.hdf5"):
        check_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="num_classes"):
        check_dataset(tmp_path, num_classes=0)
