"""Datasets and data loaders from a ``TrainConfig``, and the resumable, rank-sharded infinite sampler.

``build_data`` checks everything a run needs from its data before training starts (paths exist, the
images have the model's channel count, the masks fit its classes) and raises ``ConfigError`` or
``DataError`` with a message naming the key or the file.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from napari_iscat_diffusion.io.tiff_pairs import DataError
from napari_iscat_diffusion.iscat.simulate import SimulationParameters

from .augment import AugmentConfig
from .config import ConfigError, TrainConfig
from .datasets import Hdf5Source, IscatDataset, RawItem, SimulatorSource, Source, TiffPairSource, collate_items
from .finetune import initial_normalization
from .normalization import compute_normalization

# Validation images of the simulator come from seeds far above the training seeds.
_SIMULATOR_VAL_SEED = 1_000_000_000


class InfiniteSampler(Sampler):
    """Endless ``(index, epoch)`` pairs: each epoch a fresh permutation, split between ranks.

    Epoch ``e``'s order is ``randperm(n)`` from a generator seeded with ``(seed, e)``, padded to a
    multiple of ``world_size`` and dealt round-robin, so rank ``r`` gets every ``world_size``-th item.
    ``set_position(items)`` makes the next iterator start after ``items`` items of this rank (resume).
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.length, self.rank, self.world_size, self.seed = length, rank, world_size, seed
        self.per_rank = math.ceil(length / world_size)
        self.position = 0

    def set_position(self, items: int) -> None:
        """Start the next iterator after ``items`` items of this rank."""
        self.position = items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.position, self.per_rank)
        while True:
            state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)[0]
            generator = torch.Generator().manual_seed(int(state) % 2**63)
            order = torch.randperm(self.length, generator=generator).tolist()
            order += order[: self.per_rank * self.world_size - self.length]  # pad, as DistributedSampler does
            for index in order[self.rank :: self.world_size][offset:]:
                yield index, epoch
            epoch, offset = epoch + 1, 0


class ShardSampler(Sampler):
    """The indices ``rank, rank + world_size, ...`` of a finite dataset, in order (validation)."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SubsetSource:
    """Some items of another source, by index (a held-out validation part)."""

    def __init__(self, source: Source, indices: list[int]) -> None:
        self.source, self.indices = source, indices
        self.location = source.location
        self.num_mask_classes = source.num_mask_classes

    def __len__(self) -> int:
        return len(self.indices)

    def read_image(self, index: int) -> tuple[np.ndarray, str]:
        return self.source.read_image(self.indices[index])

    def read(self, index: int) -> RawItem:
        return self.source.read(self.indices[index])


@dataclass
class Data:
    """What ``build_data`` returns: the two loaders and facts for the exported model."""

    train_loader: DataLoader
    val_loader: DataLoader
    normalization: dict
    pixel_size_nm: float | None
    class_names: list[str] | None


def build_sources(config: TrainConfig) -> tuple[Source, Source, float | None, list[str] | None]:
    """(train source, validation source, pixel size in nm or None, class names or None) from ``config.data``."""
    data = config.data
    if data.source == "simulator":
        try:
            params = SimulationParameters.from_dict(data.simulator)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"data.simulator: {err}") from err
        if not 1 <= data.simulator_train_items <= _SIMULATOR_VAL_SEED:
            raise ConfigError(f"data.simulator_train_items: must be 1..{_SIMULATOR_VAL_SEED}")
        train = SimulatorSource(params, data.simulator_train_items, frames_per_channel=data.frames_per_channel)
        val = SimulatorSource(
            params, data.simulator_val_items, base_seed=_SIMULATOR_VAL_SEED, frames_per_channel=data.frames_per_channel
        )
        names = [c.name for c in params.particle_classes]
        return train, val, params.pixel_size_nm, names if len(names) == params.num_labels else None
    if data.path is None:
        raise ConfigError(f"data.path: required for data.source={data.source!r} (the TIFF folder or HDF5 file)")
    for key in ("path", "val_path"):
        value = getattr(data, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"data.{key}: {value} does not exist")
    if data.source == "tiff":
        train: Source = TiffPairSource(data.path, split="train", frames_per_channel=data.frames_per_channel)
        if not any(pair.mask for pair in train.pairs):
            # As in `iscat-diffusion dataset check`: a mask-conditioned model would learn nothing of masks.
            raise DataError(data.path, "no training image has a mask; expected NAME_mask.tif or masks/NAME.tif")
        # The validation images must have as many planes as the training images, whose planes become channels.
        same = {"frames_per_channel": data.frames_per_channel, "planes": train.planes}
        if data.val_path is not None:
            return train, TiffPairSource(data.val_path, **same), None, None
        try:
            return train, TiffPairSource(data.path, split="val", **same), None, None
        except DataError:
            pass  # not pre-split: hold out a part below
    else:
        train = Hdf5Source(data.path, frames_per_channel=data.frames_per_channel)
        if data.val_path is not None:
            return train, Hdf5Source(data.val_path, frames_per_channel=data.frames_per_channel), None, None
    held_out = max(1, round(len(train) * data.val_fraction))
    if held_out >= len(train):
        raise DataError(data.path, f"has {len(train)} item(s): too few to hold out data.val_fraction for validation")
    everything = list(range(len(train)))
    return SubsetSource(train, everything[:-held_out]), SubsetSource(train, everything[-held_out:]), None, None


def build_data(config: TrainConfig, rank: int = 0, world_size: int = 1) -> Data:
    """Datasets, normalisation and loaders for this rank; raises ConfigError or DataError before training."""
    unet = config.unet_config()
    train_source, val_source, pixel_size, names = build_sources(config)
    try:
        augment = AugmentConfig(**config.data.augment)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"data.augment: {err}") from err
    if train_source.num_mask_classes is not None and train_source.num_mask_classes < unet.num_classes:
        warnings.warn(
            f"the masks have {train_source.num_mask_classes} classes but model.num_classes={unet.num_classes}; "
            "the extra classes are never trained",
            stacklevel=2,
        )
    common = {"num_classes": unet.num_classes, "crop_size": config.data.crop_size, "seed": config.seed}
    train = IscatDataset(train_source, augment=augment, **common)
    if train.channels != unet.image_channels:
        raise DataError(
            train_source.location,
            f"images have {train.channels} channel(s) (data.frames_per_channel={config.data.frames_per_channel}) "
            f"but model.image_channels={unet.image_channels}; change one of them",
        )
    val = IscatDataset(val_source, channels=train.channels, **common)
    if config.data.normalization == "init_from":
        normalization = initial_normalization(config, train.channels)
    else:
        try:
            normalization = compute_normalization(train, max_images=config.data.normalization_images, seed=config.seed)
        except DataError:
            raise  # a bad image among those read, named
        except ValueError as err:
            raise DataError(train_source.location, f"no normalisation statistics: {err}") from err
    # Set before validating: every item's values are checked against the normalisation's median and spread.
    train.normalization = val.normalization = normalization
    if config.data.validate:
        train.validate()
        val.validate()
    # The first item of each part is read now, so that a mask label above model.num_classes or a crop
    # larger than the images fails here and not mid-run (data.validate=true reads every item).
    _ = train[0], val[0]
    workers = config.data.num_workers
    # Each loader gets its own generator: iterating a loader draws a worker base seed, which would
    # otherwise come from the global torch RNG and make a resumed run's dropout differ from an
    # uninterrupted one (the items themselves are seeded per (seed, epoch, index)).
    train_loader = DataLoader(
        train,
        batch_size=config.train.batch_size,
        sampler=InfiniteSampler(len(train), rank, world_size, config.seed),
        collate_fn=collate_items,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = DataLoader(
        val,
        batch_size=config.train.batch_size,
        sampler=ShardSampler(len(val), rank, world_size),
        collate_fn=collate_items,
        generator=torch.Generator().manual_seed(config.seed),
    )
    # data.class_names is checked against model.num_classes with the config; the simulator's may not fit it.
    class_names = config.data.class_names if config.data.class_names is not None else names
    if class_names is not None and len(class_names) != unet.num_classes:
        class_names = None
    pixel_size = config.data.pixel_size_nm if config.data.pixel_size_nm is not None else pixel_size
    return Data(train_loader, val_loader, normalization, pixel_size, class_names)
