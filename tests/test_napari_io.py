"""The npe2 reader, writer and sample data (no viewer needed), and what opening napari with the plugin imports."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_iscat_diffusion._napari_io import get_reader, write_pair
from napari_iscat_diffusion._sample_data import simulated_pair
from napari_iscat_diffusion.io.tiff_pairs import DataError, read_pixel_size_nm

REPO = Path(__file__).resolve().parents[1]


def _pair(size=(12, 16), label=1):
    image = np.linspace(-0.01, 0.01, size[0] * size[1], dtype=np.float32).reshape(size)
    mask = np.zeros(size, np.uint8)
    mask[2:5, 3:6] = label
    return image, mask


def test_writer_then_reader_round_trip_with_pixel_size(tmp_path):
    image, mask = _pair()
    written = write_pair(
        str(tmp_path / "cell.tif"),
        [(image, {"scale": (0.06, 0.06)}, "image"), (mask, {"scale": (0.06, 0.06)}, "labels")],
    )
    assert written == [str(tmp_path / "images" / "cell.tif"), str(tmp_path / "masks" / "cell.tif")]
    assert read_pixel_size_nm(tmp_path / "images" / "cell.tif") == pytest.approx(60.0)
    reader = get_reader(written[0])
    assert reader is not None
    (image_data, image_meta, image_kind), (mask_data, mask_meta, mask_kind) = reader(written[0])
    assert (image_kind, mask_kind) == ("image", "labels")
    np.testing.assert_array_equal(image_data, image)
    np.testing.assert_array_equal(mask_data, mask)
    assert image_meta["name"] == "cell" and mask_meta["name"] == "cell mask"
    np.testing.assert_allclose(image_meta["scale"], (0.06, 0.06))
    np.testing.assert_allclose(mask_meta["scale"], (0.06, 0.06))


def test_writer_never_overwrites_and_needs_one_image_and_one_labels_layer(tmp_path):
    image, mask = _pair()
    layers = [(image, {}, "image"), (mask, {}, "labels")]
    write_pair(str(tmp_path / "a.tif"), layers)
    before = (tmp_path / "images" / "a.tif").read_bytes()
    with pytest.raises(FileExistsError, match=r"a\.tif"):
        write_pair(str(tmp_path / "a.tif"), [(image * 2, {}, "image"), (mask, {}, "labels")])
    assert (tmp_path / "images" / "a.tif").read_bytes() == before
    assert read_pixel_size_nm(tmp_path / "images" / "a.tif") is None  # scale 1 means no pixel size was known
    with pytest.raises(ValueError, match="exactly one Image layer and one Labels layer"):
        write_pair(str(tmp_path / "b.tif"), [(image, {}, "image"), (image, {}, "image")])


def test_writer_saves_a_pair_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from napari_iscat_diffusion import _napari_io

    real = _napari_io.write_tiff

    def disk_full_at_the_mask(path, array, **kwargs):
        if path.parent.name == "masks":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, array, **kwargs)

    monkeypatch.setattr(_napari_io, "write_tiff", disk_full_at_the_mask)
    with pytest.raises(OSError, match="No space left"):
        write_pair(str(tmp_path / "a.tif"), [(_pair()[0], {}, "image"), (_pair()[1], {}, "labels")])
    assert not (tmp_path / "images" / "a.tif").exists()


def test_reader_opens_a_folder_of_pairs_as_two_stacks(tmp_path):
    for i in range(3):
        image, mask = _pair(label=i + 1)
        tifffile.imwrite(tmp_path / f"p{i}.tif", image)
        tifffile.imwrite(tmp_path / f"p{i}_mask.tif", mask)
    reader = get_reader(str(tmp_path))
    assert reader is not None
    (images, _, _), (masks, masks_meta, _) = reader(str(tmp_path))
    assert images.shape == masks.shape == (3, 12, 16)
    assert [int(m.max()) for m in masks] == [1, 2, 3]
    assert masks_meta["name"] == f"{tmp_path.name} masks"
    assert get_reader(str(tmp_path / "p0.tif")) is not None  # one image with its NAME_mask.tif beside it


def test_reader_leaves_other_files_to_other_readers_and_names_problems(tmp_path):
    image, mask = _pair()
    tifffile.imwrite(tmp_path / "lonely.tif", image)
    assert get_reader(str(tmp_path / "lonely.tif")) is None
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader([str(tmp_path / "lonely.tif")]) is None
    tifffile.imwrite(tmp_path / "paired.tif", image)
    tifffile.imwrite(tmp_path / "paired_mask.tif", mask)
    with pytest.raises(DataError, match=r"lonely\.tif"):
        get_reader(str(tmp_path))(str(tmp_path))


@pytest.mark.parametrize("open_folder", [False, True])
def test_reader_refuses_a_mask_of_another_size_than_its_image(tmp_path, open_folder):
    for name, size in (("a", (12, 16)), ("b", (12, 15))):
        image, _ = _pair()
        _, mask = _pair(size)
        tifffile.imwrite(tmp_path / f"{name}.tif", image)
        tifffile.imwrite(tmp_path / f"{name}_mask.tif", mask)
    path = str(tmp_path if open_folder else tmp_path / "b.tif")
    with pytest.raises(DataError, match=r"b_mask\.tif: mask is 12x15 pixels but its image b\.tif is 12x16"):
        get_reader(path)(path)


def test_sample_data_is_a_simulated_image_with_its_mask():
    (image, image_meta, image_kind), (mask, mask_meta, mask_kind) = simulated_pair()
    assert (image_kind, mask_kind) == ("image", "labels")
    assert image.shape == mask.shape == (256, 256) and image.dtype == np.float32
    assert mask.max() >= 1 and np.issubdtype(mask.dtype, np.integer)
    assert abs(float(np.median(image))) < 0.01  # a contrast map around 0, not a min/max-normalised picture
    assert image_meta["scale"] == mask_meta["scale"] and image_meta["scale"][0] < 1
    np.testing.assert_array_equal(simulated_pair()[0][0], image)  # fixed seed


def test_package_reader_writer_and_sample_data_import_no_torch_and_no_qt():
    # napari imports these when it starts or opens a file; torch must wait until a widget is opened
    code = (
        "import sys, napari_iscat_diffusion, napari_iscat_diffusion._napari_io, napari_iscat_diffusion._sample_data; "
        "napari_iscat_diffusion._sample_data.simulated_pair(); print('\\n'.join(sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    modules = set(result.stdout.split())
    assert "napari_iscat_diffusion._sample_data" in modules
    assert "torch" not in modules
    assert not any(m.split(".")[0] in {"qtpy", "PyQt6", "PyQt5", "PySide6"} for m in modules)


def test_the_manifest_points_at_importable_commands_and_widgets_import_torch_only_when_opened():
    import yaml

    manifest = yaml.safe_load((REPO / "napari.yaml").read_text())
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    code = (
        "import importlib, sys; "
        f"names = {sorted(commands.values())!r}; "
        "[getattr(importlib.import_module(n.split(':')[0]), n.split(':')[1]) for n in names "
        "if '_widgets' not in n]; print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "False"
    widget_commands = [w["command"] for w in manifest["contributions"]["widgets"]]
    assert all("_widgets" in commands[c] for c in widget_commands)
