"""training/train.py stops with exit status 2 and a message naming the key or file, before any training, for
missing data paths and data whose classes (K) or image channels (C) do not fit the model."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from tests.tiny_training import contrast_tiff_pairs, tiny_overrides
from training import train


def _hdf5(path: Path, planes: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    masks = np.zeros((6, classes, 40, 40), np.uint8)
    masks[:, -1, 10:14, 10:14] = 1
    with h5py.File(path, "w") as file:
        file["image_patches"] = rng.normal(1.0, 0.01, (6, planes, 40, 40)).astype(np.float32)
        file["mask_patches"] = masks
    return path


def _tiff_folder(root: Path, first_label: int) -> Path:
    """Four pairs; the first mask holds ``first_label``, the others label 1."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for index in range(4):
        mask = np.zeros((40, 40), np.uint8)
        mask[5:9, 5:9] = first_label if index == 0 else 1
        tifffile.imwrite(root / f"p{index}.tif", rng.normal(0, 0.01, (40, 40)).astype(np.float32))
        tifffile.imwrite(root / f"p{index}_mask.tif", mask)
    return root


def _fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    run_dir = tmp_path / "run"
    assert train.main(tiny_overrides(run_dir, "model.num_classes=2", *extra)) == 2
    assert not run_dir.exists()  # nothing was trained or written
    return capsys.readouterr().err


def test_missing_data_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    err = _fails_before_training(tmp_path, capsys, "data.source=tiff", f"data.path={missing}")
    assert f"error: data.path: {missing} does not exist" in err


@pytest.mark.parametrize("key", ["data.path", "run_dir"])
def test_a_name_longer_than_the_file_system_allows(tmp_path: Path, capsys: pytest.CaptureFixture, key: str) -> None:
    long = tmp_path / ("a" * 300)  # os.stat raises ENAMETOOLONG for it instead of answering "missing"
    err = _fails_before_training(tmp_path, capsys, "data.source=tiff", f"data.path={tmp_path}", f"{key}={long}")
    assert "File name too long" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_hdf5_fifo_is_refused_instead_of_waiting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fifo = tmp_path / "data.h5"
    os.mkfifo(fifo)  # HDF5 would wait for a writer forever
    err = _fails_before_training(tmp_path, capsys, "data.source=hdf5", f"data.path={fifo}")
    assert f"error: {fifo}: is not a regular file" in err


def test_missing_validation_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _hdf5(tmp_path / "train.h5", planes=1, classes=2)
    missing = tmp_path / "val.h5"
    err = _fails_before_training(tmp_path, capsys, "data.source=hdf5", f"data.path={data}", f"data.val_path={missing}")
    assert f"data.val_path: {missing} does not exist" in err


def test_data_path_is_required_for_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "data.path: required for data.source='hdf5'" in _fails_before_training(tmp_path, capsys, "data.source=hdf5")


def test_more_mask_classes_than_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _hdf5(tmp_path / "three.h5", planes=1, classes=3)
    err = _fails_before_training(tmp_path, capsys, "data.source=hdf5", f"data.path={data}")
    assert f"{data}: masks have 3 particle classes but num_classes=2" in err


def test_image_channels_differ_from_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _hdf5(tmp_path / "planes.h5", planes=2, classes=2)
    err = _fails_before_training(tmp_path, capsys, "data.source=hdf5", f"data.path={data}", "data.frames_per_channel=1")
    assert f"{data}: images have 2 channel(s)" in err and "model.image_channels=1" in err


def test_a_tiff_mask_label_above_the_model_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _tiff_folder(tmp_path / "pairs", first_label=3)
    err = _fails_before_training(tmp_path, capsys, "data.source=tiff", f"data.path={root}")
    assert "p0_mask.tif: contains label 3 but num_classes=2" in err


def _with_pixel(value: float) -> np.ndarray:
    image = np.random.default_rng(1).normal(0, 0.01, (40, 40)).astype(np.float32)
    image[3, 3] = value
    return image


@pytest.mark.parametrize(
    ("bad_image", "message"),
    [
        (_with_pixel(np.nan), "p1.tif: 1 NaN and 0 Inf pixels"),
        (_with_pixel(3e38), "p1.tif: a pixel of magnitude 3e+38, above 1e+18"),
        (np.full((40, 40, 3), 120, np.uint8), "p1.tif: is an RGB image (3 samples per pixel)"),
        (np.stack([_with_pixel(0.0)] * 3), "p1.tif: has 3 plane(s) (Z frames or colour samples) but"),
    ],
    ids=["nan", "huge", "rgb", "planes"],
)
def test_bad_pixels_stop_the_run_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, bad_image: np.ndarray, message: str
) -> None:
    root = contrast_tiff_pairs(tmp_path / "pairs", 4, bad=1, bad_image=bad_image)
    err = _fails_before_training(tmp_path, capsys, "data.source=tiff", f"data.path={root}")
    assert f"error: {root / message}" in err and len(err.strip().splitlines()) == 1


def test_an_outlier_read_by_a_loader_worker_mid_run_stops_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Training items p0..p6, validation p7; p0, p7 and the one normalisation image (p5) are read before training.
    root = contrast_tiff_pairs(tmp_path / "pairs", 8, bad=3)
    run_dir = tmp_path / "run"
    overrides = ["data.source=tiff", f"data.path={root}", "data.normalization_images=1", "data.num_workers=1"]
    assert train.main(tiny_overrides(run_dir, "model.num_classes=2", *overrides)) == 2
    err = capsys.readouterr().err
    assert f"error: {root / 'p3.tif'}: a pixel of 1e+06 lies 9.99e+07 robust spreads" in err
    assert run_dir.exists() and not (run_dir / "model.safetensors").exists()  # it stopped mid-run


def test_an_hdf5_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "patches.h5"
    folder.mkdir()
    err = _fails_before_training(tmp_path, capsys, "data.source=hdf5", f"data.path={folder}")
    assert err == f"error: {folder}: is a folder; expected an HDF5 file with image_patches and mask_patches\n"


def test_a_tiff_folder_without_any_mask(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = contrast_tiff_pairs(tmp_path / "pairs", 4, bad=-1)
    for mask in root.glob("*_mask.tif"):
        mask.unlink()
    err = _fails_before_training(tmp_path, capsys, "data.source=tiff", f"data.path={root}")
    assert err == f"error: {root}: no training image has a mask; expected NAME_mask.tif or masks/NAME.tif\n"
