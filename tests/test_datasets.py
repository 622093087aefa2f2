"""The training dataset: TIFF, HDF5 and simulator sources, crops, seeding, workers and data errors."""

import pickle

import h5py
import numpy as np
import pytest
import tifffile
import torch
from torch.utils.data import DataLoader
from training.augment import AugmentConfig
from training.datasets import Hdf5Source, IscatDataset, SimulatorSource, TiffPairSource
from training.normalization import compute_normalization

from napari_iscat_diffusion.io.tiff_pairs import DataError
from napari_iscat_diffusion.iscat.simulate import SimulationParameters, simulate

UNIT = {"mean": [0.0], "std": [1.0]}


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack")


def _image(seed, shape=(20, 24)):
    return np.random.default_rng(seed).normal(3.0, 0.5, shape).astype(np.float32)


def _mask(seed, shape=(20, 24), high=2):
    return np.random.default_rng(seed + 100).integers(0, high + 1, shape).astype(np.uint8)


def _find_window(big, small):
    """(top, left) of every place where ``small`` (..., h, w) equals a window of ``big`` (..., H, W)."""
    h, w = small.shape[-2:]
    return [
        (top, left)
        for top in range(big.shape[-2] - h + 1)
        for left in range(big.shape[-1] - w + 1)
        if np.allclose(big[..., top : top + h, left : left + w], small, rtol=1e-6, atol=1e-6)
    ]


def test_images_and_masks_folders_give_aligned_normalised_crops(tmp_path):
    names = {"a": "a.tif", "b": "b_mask.tif", "c": "c_gt.tif"}
    for seed, (name, mask_file) in enumerate(names.items()):
        _write(tmp_path / "images" / f"{name}.tif", _image(seed))
        _write(tmp_path / "masks" / mask_file, _mask(seed))
    stats = {"mean": [1.0], "std": [0.5]}
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2, crop_size=(12, 16), normalization=stats)
    assert len(dataset) == 3 and dataset.channels == 1
    for seed, name in enumerate(names):
        item = dataset[seed]
        assert item["name"] == name and item["has_mask"] is True
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 12, 16)
        assert item["labels"].dtype == torch.int64 and item["labels"].shape == (12, 16)
        physical = item["image"].numpy() * 0.5 + 1.0  # physical = normalised * std + mean
        windows = _find_window(_image(seed)[None], physical)
        assert len(windows) == 1
        top, left = windows[0]
        np.testing.assert_array_equal(item["labels"].numpy(), _mask(seed)[top : top + 12, left : left + 16])
        np.testing.assert_array_equal(dataset.raw_image(seed), _image(seed)[None])


def test_flat_folder_with_an_unlabelled_image(tmp_path):
    _write(tmp_path / "x.tif", _image(0))
    _write(tmp_path / "x_gt.tif", _mask(0))
    _write(tmp_path / "y.tif", _image(1))
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2, normalization=UNIT)
    unlabelled = dataset[1]
    assert unlabelled["name"] == "y" and unlabelled["has_mask"] is False
    assert unlabelled["labels"].dtype == torch.int64 and not unlabelled["labels"].any()
    assert torch.equal(dataset[0]["labels"], torch.from_numpy(_mask(0).astype(np.int64)))
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["has_mask"].tolist() == [True, False] and batch["name"] == ["x", "y"]


def test_unmatched_masks_are_reported(tmp_path):
    _write(tmp_path / "x.tif", _image(0))
    _write(tmp_path / "lost_mask.tif", _mask(0))
    with pytest.warns(UserWarning, match="lost_mask"):
        TiffPairSource(tmp_path)


def _split_tree(root):
    for seed, name in enumerate(["t1", "t2"]):
        _write(root / "train" / "images" / f"{name}.tif", _image(seed))
        _write(root / "train" / "masks" / f"{name}_mask.tif", _mask(seed))
    _write(root / "val" / "v1.tif", _image(5))
    _write(root / "val" / "v1_gt.tif", _mask(5))


@pytest.mark.parametrize(("split", "names"), [("train", ["t1", "t2"]), ("val", ["v1"]), (None, ["t1", "t2", "v1"])])
def test_pre_split_folders(tmp_path, split, names):
    _split_tree(tmp_path)
    dataset = IscatDataset(TiffPairSource(tmp_path, split=split), num_classes=2, normalization=UNIT)
    assert [dataset[i]["name"] for i in range(len(dataset))] == names


def test_split_of_a_folder_that_is_not_split(tmp_path):
    _write(tmp_path / "x.tif", _image(0))
    assert len(TiffPairSource(tmp_path, split="train")) == 1
    with pytest.raises(DataError, match="no 'val' split"):
        TiffPairSource(tmp_path, split="val")


def test_tiff_stacks_are_averaged_into_channels(tmp_path):
    stack = np.stack([_image(z) for z in range(4)])
    _write(tmp_path / "s.tif", stack)
    dataset = IscatDataset(TiffPairSource(tmp_path, frames_per_channel=2), num_classes=2, normalization=None)
    assert dataset.channels == 2
    np.testing.assert_allclose(dataset.raw_image(0), [stack[:2].mean(0), stack[2:].mean(0)], rtol=1e-6)


def _hdf5(path, count=3, frames=10, classes=2, size=8):
    """Frame z of patch n holds 100 n + z + a pixel ramp; class c marks a 2x2 square at (4c, 4c)."""
    ramp = np.arange(size * size).reshape(size, size) / 64
    images = np.array([[100 * n + z + ramp for z in range(frames)] for n in range(count)], dtype=np.float32)
    masks = np.zeros((count, classes, size, size), dtype=np.uint8)
    for c in range(classes):
        masks[:, c, 4 * c : 4 * c + 2, 4 * c : 4 * c + 2] = 1
    with h5py.File(path, "w") as file:
        file["image_patches"] = images
        file["mask_patches"] = masks
    return images


@pytest.mark.parametrize(("frames_per_channel", "means"), [(5, [2.0, 7.0]), (10, [4.5]), (None, [4.5]), (2, None)])
def test_hdf5_frames_average_exactly_into_channels(tmp_path, frames_per_channel, means):
    _hdf5(tmp_path / "p.h5")
    source = Hdf5Source(tmp_path / "p.h5", frames_per_channel=frames_per_channel)
    dataset = IscatDataset(source, num_classes=2, normalization=None)
    ramp = np.arange(64).reshape(8, 8) / 64
    for n in range(3):
        raw = dataset.raw_image(n)
        assert raw.dtype == np.float32
        expected = (
            [100 * n + z + ramp for z in np.arange(0.5, 10, 2)]
            if means is None
            else [100 * n + m + ramp for m in means]
        )
        np.testing.assert_array_equal(raw, np.array(expected, dtype=np.float32))


def test_hdf5_class_masks_become_one_label_image(tmp_path):
    _hdf5(tmp_path / "p.h5")
    dataset = IscatDataset(Hdf5Source(tmp_path / "p.h5"), num_classes=2, normalization=UNIT)
    labels = dataset[1]["labels"]
    assert dataset[1]["name"] == "p[1]" and dataset[1]["has_mask"] is True
    expected = torch.zeros(8, 8, dtype=torch.int64)
    expected[0:2, 0:2], expected[4:6, 4:6] = 1, 2
    assert torch.equal(labels, expected)


def test_hdf5_frames_that_do_not_divide_are_refused(tmp_path):
    _hdf5(tmp_path / "p.h5")
    with pytest.raises(DataError, match=r"p\.h5.*10 frames.*frames_per_channel=3"):
        Hdf5Source(tmp_path / "p.h5", frames_per_channel=3)


def test_hdf5_with_more_classes_than_the_model_is_refused(tmp_path):
    _hdf5(tmp_path / "p.h5", classes=3)
    with pytest.raises(DataError, match=r"p\.h5.*3 particle classes.*num_classes=2"):
        IscatDataset(Hdf5Source(tmp_path / "p.h5"), num_classes=2)


def test_hdf5_loads_in_two_workers_after_the_parent_opened_it(tmp_path):
    _hdf5(tmp_path / "p.h5", count=6, size=16)
    dataset = IscatDataset(Hdf5Source(tmp_path / "p.h5", frames_per_channel=5), num_classes=2, crop_size=(8, 8))
    dataset.normalization = compute_normalization(dataset)  # opens the file in this process first
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.source._file is None and torch.equal(copy[4]["image"], dataset[4]["image"])
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)
    assert [name for batch in batches for name in batch["name"]] == [f"p[{i}]" for i in range(6)]
    images = torch.cat([batch["image"] for batch in batches])
    assert torch.equal(images, torch.stack([dataset[i]["image"] for i in range(6)]))


PARAMS = SimulationParameters(image_size=(24, 32), particles_per_image=(2, 4), focal_planes_nm=(0.0, 150.0))


def test_simulator_items_depend_on_the_index_only():
    source = SimulatorSource(PARAMS, 5, base_seed=7, frames_per_channel=1)
    dataset = IscatDataset(source, num_classes=PARAMS.num_labels, normalization={"mean": [0, 0], "std": [1, 1]})
    again = IscatDataset(SimulatorSource(PARAMS, 5, base_seed=7, frames_per_channel=1), num_classes=PARAMS.num_labels)
    again.normalization = dataset.normalization
    simulated = simulate(PARAMS, 9)
    item = dataset[2]
    np.testing.assert_array_equal(item["image"].numpy(), simulated.image)
    np.testing.assert_array_equal(item["labels"].numpy(), simulated.mask)
    assert item["has_mask"] is True and dataset.channels == 2
    assert torch.equal(again[2]["image"], item["image"]) and torch.equal(dataset[2]["image"], item["image"])
    assert not torch.equal(dataset[3]["image"], item["image"])
    with pytest.raises(DataError, match="particle classes"):
        IscatDataset(source, num_classes=PARAMS.num_labels - 1)


def test_crops_and_augmentation_follow_seed_epoch_and_index(tmp_path):
    _write(tmp_path / "big.tif", _image(0, (48, 48)))
    _write(tmp_path / "big_mask.tif", _mask(0, (48, 48)))
    source = TiffPairSource(tmp_path)

    def make(seed):
        options = {"num_classes": 2, "crop_size": (16, 16), "normalization": UNIT, "seed": seed}
        return IscatDataset(source, augment=AugmentConfig(noise=0.5), **options)

    dataset = make(0)
    first = dataset[0]["image"]
    assert torch.equal(make(0)[0]["image"], first)
    assert not torch.equal(make(1)[0]["image"], first)
    dataset.set_epoch(1)
    second = dataset[0]["image"]
    assert not torch.equal(second, first)
    assert torch.equal(make(0)[(0, 1)]["image"], second)  # (index, epoch) from a sampler
    assert len({tuple(dataset[(0, epoch)]["image"].flatten()[:8].tolist()) for epoch in range(6)}) == 6


def test_contrast_between_images_survives_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    for name, contrast in (("dim", 0.03), ("bright", 0.3)):
        image = rng.normal(0.0, 1e-3, (32, 32)).astype(np.float32)
        image[10:14, 10:14] += contrast
        _write(tmp_path / f"{name}.tif", image)
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=1)
    dataset.normalization = compute_normalization(dataset)
    heights = {}
    for i in range(2):
        item = dataset[i]
        image = item["image"][0]
        heights[item["name"]] = float(image[10:14, 10:14].mean() - image[20:, 20:].median())
    assert heights["bright"] / heights["dim"] == pytest.approx(10.0, rel=0.02)


def test_labels_above_the_class_count_name_the_mask(tmp_path):
    _write(tmp_path / "ok.tif", _image(0))
    _write(tmp_path / "ok_mask.tif", _mask(0))
    _write(tmp_path / "wrong.tif", _image(1))
    _write(tmp_path / "wrong_mask.tif", _mask(1, high=3))
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2, normalization=UNIT)
    dataset[0]
    with pytest.raises(DataError, match=r"wrong_mask\.tif.*label 3.*num_classes=2"):
        dataset[1]
    with pytest.raises(DataError, match=r"(?s)1 of 2 items.*wrong_mask\.tif"):
        dataset.validate()


def test_size_mismatch_names_image_and_mask(tmp_path):
    _write(tmp_path / "odd.tif", _image(0))
    _write(tmp_path / "odd_gt.tif", _mask(0, shape=(20, 20)))
    _write(tmp_path / "zbad.tif", _image(0))
    _write(tmp_path / "zbad_gt.tif", _mask(0, high=5))
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2, normalization=UNIT)
    with pytest.raises(DataError, match=r"odd_gt\.tif.*odd\.tif"):
        dataset[0]
    with pytest.raises(DataError, match=r"(?s)2 of 2 items.*odd_gt\.tif.*zbad_gt\.tif"):
        dataset.validate()


def test_wrong_channel_count_names_the_image(tmp_path):
    _write(tmp_path / "a.tif", np.stack([_image(0), _image(1)]))
    _write(tmp_path / "b.tif", _image(2))
    dataset = IscatDataset(TiffPairSource(tmp_path, frames_per_channel=1), num_classes=2)
    assert dataset.channels == 2
    with pytest.raises(DataError, match=r"b\.tif: has 1 plane\(s\).*a\.tif has 2"):
        dataset.raw_image(1)
    with pytest.raises(DataError, match=r"a\.tif.*2 image channel.*1 are expected"):
        IscatDataset(TiffPairSource(tmp_path, frames_per_channel=1), num_classes=2, channels=1, normalization=UNIT)[0]


def test_crop_larger_than_the_image_names_it(tmp_path):
    _write(tmp_path / "small.tif", _image(0))
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2, crop_size=(32, 32), normalization=UNIT)
    with pytest.raises(DataError, match=r"small\.tif.*smaller than crop_size"):
        dataset[0]


def test_normalisation_must_be_set_and_fit(tmp_path):
    _write(tmp_path / "a.tif", _image(0))
    dataset = IscatDataset(TiffPairSource(tmp_path), num_classes=2)
    with pytest.raises(RuntimeError, match="normalization"):
        dataset[0]
    with pytest.raises(ValueError, match="1 mean"):
        dataset.normalization = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
    with pytest.raises(IndexError):
        dataset.raw_image(1)
