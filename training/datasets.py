"""The training dataset: normalised, cropped, augmented image/label pairs from one of three sources.

Sources hand out raw items (physical units, full size) by index:

- ``TiffPairSource``: a folder of TIFF image/mask pairs (``find_pairs`` layouts, optional train/val split);
- ``Hdf5Source``: an HDF5 file with ``image_patches`` (N, Z, H, W) and ``mask_patches`` (N, C, H, W);
- ``SimulatorSource``: the iSCAT simulator, item i drawn with seed ``base_seed + i``.

``IscatDataset`` turns raw items into training items. Randomness: item ``index`` in epoch ``epoch``
takes its crop and augmentation from a torch generator seeded with ``item_seed(seed, epoch, index)``,
so an item is the same whatever DataLoader worker loads it. Call ``set_epoch`` before each epoch
(DataLoader copies the dataset into its workers when an epoch's iterator starts, unless
``persistent_workers=True``), or index the dataset with ``(index, epoch)`` pairs from the sampler.
DDP ranks should use different ``seed`` values (for example base seed + rank).

Stacks of frames or focal planes (Z, H, W) become image channels by averaging consecutive chunks of
``frames_per_channel`` frames (None: all frames into one channel); a 2-D image is one channel.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.io.hdf5_patches import (
    IMAGE_PATCHES,
    MASK_PATCHES,
    import_h5py,
    labels_from_class_masks,
    patch_layout,
)
from napari_iscat_diffusion.io.pixel_values import ValueBounds, value_problem
from napari_iscat_diffusion.io.tiff_pairs import DataError, find_pairs, read_image, read_mask
from napari_iscat_diffusion.iscat.simulate import SimulationParameters, simulate

from .augment import AugmentConfig, augment
from .normalization import normalize
from .particle_contrast import contrast_channel

_LISTED_ERRORS = 10  # bad items spelled out by validate(); the rest are counted


@dataclass(frozen=True)
class RawItem:
    """One item as stored: image float32 (C, H, W) in physical units, labels (H, W) 0..K or None."""

    image: np.ndarray
    labels: np.ndarray | None
    name: str
    image_origin: str  # where the image was read from (file, dataset and index), for error messages
    mask_origin: str | None


class Source(Protocol):
    """Raw items by index.

    ``location`` names the source in errors; ``num_mask_classes`` is the number of classes its masks
    can hold, None when only reading the masks tells.
    """

    location: str
    num_mask_classes: int | None

    def __len__(self) -> int: ...

    def read_image(self, index: int) -> tuple[np.ndarray, str]: ...

    def read(self, index: int) -> RawItem: ...


def frames_to_channels(stack: np.ndarray, frames_per_channel: int | None, origin: str) -> np.ndarray:
    """Average a (Z, H, W) stack in chunks of ``frames_per_channel`` frames into float32 (Z / chunk, H, W).

    None averages all frames into one channel; a 2-D image (H, W) becomes (1, H, W).
    """
    array = np.asarray(stack)
    if array.ndim == 2:
        return array.astype(np.float32)[None]
    if array.ndim != 3:
        raise DataError(origin, f"image has shape {array.shape}; expected (H, W) or (Z, H, W)")
    frames = len(array)
    chunk = _check_chunk(frames, frames_per_channel, origin)
    # Average in float64 so a long stack of float32 frames loses no precision before the final cast.
    chunks = array.reshape(frames // chunk, chunk, *array.shape[1:]).astype(np.float64)
    return chunks.mean(axis=1).astype(np.float32)


def _check_chunk(frames: int, frames_per_channel: int | None, origin: str) -> int:
    chunk = frames if frames_per_channel is None else frames_per_channel
    if chunk < 1 or frames % chunk:
        raise DataError(
            origin,
            f"{frames} frames cannot be averaged in chunks of frames_per_channel={frames_per_channel}; "
            f"choose a divisor of {frames} (1 keeps every frame as a channel, {frames} averages all into one)",
        )
    return chunk


class TiffPairSource:
    """Image/mask TIFF pairs found by ``find_pairs`` under ``root``.

    ``split``: "train" or "val" keeps the pairs of that subfolder when the tree is pre-split. When it is
    not, "train" keeps every pair and "val" raises DataError (validating on training data would be
    silently wrong); None always keeps every pair. Pairs without a mask are kept (unconditional items).
    ``planes``: the number of planes (Z frames or colour samples) every image must have, as stored; None: that
    of the first image. Averaged into one channel, an RGB file among grayscale ones would pass unseen.
    """

    num_mask_classes = None

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        split: Literal["train", "val"] | None = None,
        frames_per_channel: int | None = None,
        planes: int | None = None,
    ) -> None:
        self.location = str(root)
        self.frames_per_channel = frames_per_channel
        listing = find_pairs(Path(root))
        pairs = listing.pairs
        splits = {pair.split for pair in pairs} - {None}
        if split is not None and (splits or split == "val"):
            pairs = [pair for pair in pairs if pair.split == split]
            if not pairs:
                found = ", ".join(sorted(splits)) or "none"
                raise DataError(root, f"has no '{split}' split (splits found: {found}); use split=None")
        if listing.unmatched_masks:
            shown = ", ".join(str(path) for path in listing.unmatched_masks[:3])
            warnings.warn(
                f"{root}: {len(listing.unmatched_masks)} mask(s) match no image and are ignored: {shown}",
                stacklevel=2,
            )
        self.pairs = pairs
        self.planes_origin = "the training images"
        if planes is None and pairs:
            self.planes_origin = str(pairs[0].image)
            planes = _planes(read_image(pairs[0].image))
        self.planes = planes

    def __len__(self) -> int:
        return len(self.pairs)

    def read_image(self, index: int) -> tuple[np.ndarray, str]:
        path = self.pairs[index].image
        stack = read_image(path)
        if _planes(stack) != self.planes:
            raise DataError(
                path,
                f"has {_planes(stack)} plane(s) (Z frames or colour samples) but {self.planes_origin} has "
                f"{self.planes}; every image needs the same number (an RGB file among grayscale ones?)",
            )
        return frames_to_channels(stack, self.frames_per_channel, str(path)), str(path)

    def read(self, index: int) -> RawItem:
        pair = self.pairs[index]
        image, origin = self.read_image(index)
        if pair.mask is None:
            return RawItem(image, None, pair.name, origin, None)
        return RawItem(image, read_mask(pair.mask), pair.name, origin, str(pair.mask))


def _planes(stack: np.ndarray) -> int:
    return 1 if stack.ndim == 2 else len(stack)


class Hdf5Source:
    """Patches in an HDF5 file: ``image_patches`` (N, Z, H, W) and ``mask_patches`` (N, C, H, W).

    Mask plane c is the binary mask of class c + 1. The file is opened lazily, once per process, on the
    first read: an open handle is never pickled or shared with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, *, frames_per_channel: int | None = None) -> None:
        self.path = Path(path)
        self.location = str(path)
        self.frames_per_channel = frames_per_channel
        if self.path.is_dir():
            raise DataError(self.path, f"is a folder; expected an HDF5 file with {IMAGE_PATCHES} and {MASK_PATCHES}")
        if self.path.exists() and not self.path.is_file():  # HDF5 would wait for a FIFO's writer forever
            raise DataError(self.path, "is not a regular file; expected an HDF5 file")
        try:
            with import_h5py().File(self.path, "r") as file:
                layout = patch_layout(file, self.path)
        except OSError as err:
            # HDF5's messages span lines (they hold a time stamp with its newline): one line for the error.
            raise DataError(self.path, f"cannot be read as HDF5 ({' '.join(str(err).split())})") from err
        _check_chunk(layout.planes, frames_per_channel, f"{self.path} [{IMAGE_PATCHES}]")
        self.length = layout.count
        self.num_mask_classes = layout.classes
        self._file = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def _open(self):
        # A forked DataLoader worker inherits the parent's handle, which HDF5 does not support: reopen per process.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = import_h5py().File(self.path, "r"), os.getpid()
        return self._file

    def __len__(self) -> int:
        return self.length

    def read_image(self, index: int) -> tuple[np.ndarray, str]:
        origin = f"{self.path} [{IMAGE_PATCHES}][{index}]"
        return frames_to_channels(self._open()[IMAGE_PATCHES][index], self.frames_per_channel, origin), origin

    def read(self, index: int) -> RawItem:
        image, origin = self.read_image(index)
        labels = labels_from_class_masks(self._open()[MASK_PATCHES][index])
        return RawItem(image, labels, f"{self.path.stem}[{index}]", origin, f"{self.path} [{MASK_PATCHES}][{index}]")


class SimulatorSource:
    """``length`` simulated images; item i is ``simulate(params, base_seed + i)``, whatever the worker."""

    location = "simulator"

    def __init__(
        self,
        params: SimulationParameters,
        length: int,
        *,
        base_seed: int = 0,
        frames_per_channel: int | None = None,
    ) -> None:
        if length < 1 or base_seed < 0:
            raise ValueError(f"SimulatorSource: need length >= 1 and base_seed >= 0, got {length} and {base_seed}")
        self.params = params
        self.length = length
        self.base_seed = base_seed
        self.frames_per_channel = frames_per_channel
        self.num_mask_classes = params.num_labels

    def __len__(self) -> int:
        return self.length

    def read_image(self, index: int) -> tuple[np.ndarray, str]:
        return self.read(index).image, self._origin(index)

    def read(self, index: int) -> RawItem:
        seed = self.base_seed + index
        simulated = simulate(self.params, seed)
        image = frames_to_channels(simulated.image, self.frames_per_channel, self._origin(index))
        return RawItem(image, simulated.mask, f"simulated-{seed}", self._origin(index), f"simulated mask (seed {seed})")

    def _origin(self, index: int) -> str:
        return f"simulated image (seed {self.base_seed + index})"


def collate_items(items: list[dict] | DataError) -> dict | DataError:
    """``default_collate``, except that a DataError from ``IscatDataset.__getitems__`` is the batch."""
    return items if isinstance(items, DataError) else default_collate(items)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of the generator for item ``index`` in ``epoch``; SeedSequence decorrelates neighbouring triples."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class IscatDataset(Dataset):
    """Training items from one source: normalised, randomly cropped and augmented.

    Args:
        source: a ``TiffPairSource``, ``Hdf5Source`` or ``SimulatorSource``.
        num_classes: K, the particle classes of the model; labels must lie in 0..K.
        crop_size: (h, w) of the random crop in pixels, or None for whole images. An image smaller than
            the crop raises DataError: padding would invent mirrored particles and speckle.
        normalization: ``{"mean": [C], "std": [C]}`` in physical units (``compute_normalization`` on
            this dataset gives it); may be set later through the attribute, must be set before indexing.
        augment: augmentation applied to every item, or None for none (validation).
        channels: expected image channels C; None takes them from the first item.
        seed: seed of every item's crop and augmentation (see the module docstring).

    ``dataset[i]`` is a dict: ``image`` float32 (C, h, w) normalised (physical = image * std + mean),
    ``labels`` int64 (h, w), ``has_mask`` bool (False: labels are all 0, train with the null condition),
    ``name`` str, and where the attribute ``contrast_prior`` is set (a network with a contrast channel),
    ``contrast`` float32 (h, w), the condition's contrast channel (``particle_contrast.contrast_channel``),
    measured in the loader's workers. Each item is checked when read (channels, mask size and labels, and the pixel
    values by ``io.pixel_values``' rules, those of ``iscat-diffusion dataset check``, against the normalisation's
    median and spread once it is set); ``validate()`` checks them all up front.
    """

    def __init__(
        self,
        source: Source,
        *,
        num_classes: int,
        crop_size: tuple[int, int] | None = None,
        normalization: dict | None = None,
        augment: AugmentConfig | None = None,
        channels: int | None = None,
        seed: int = 0,
    ) -> None:
        if len(source) == 0:
            raise DataError(source.location, "holds no items")
        if source.num_mask_classes is not None and source.num_mask_classes > num_classes:
            raise DataError(
                source.location,
                f"masks have {source.num_mask_classes} particle classes but num_classes={num_classes}; "
                "train a model with more classes or merge classes",
            )
        if crop_size is not None and (len(crop_size) != 2 or min(crop_size) < 1):
            raise ValueError(f"crop_size must be (h, w) positive pixels or None, got {crop_size!r}")
        self.source = source
        self.num_classes = num_classes
        self.crop_size = None if crop_size is None else (int(crop_size[0]), int(crop_size[1]))
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.channels = channels if channels is not None else len(source.read_image(0)[0])
        self.normalization = normalization
        self.contrast_prior: ContrastPrior | None = None

    @property
    def normalization(self) -> dict | None:
        return self._normalization

    @normalization.setter
    def normalization(self, value: dict | None) -> None:
        if value is not None and not (
            len(value["mean"]) == len(value["std"]) == self.channels and min(value["std"]) > 0
        ):
            raise ValueError(f"normalization must give {self.channels} mean(s) and std(s) > 0, got {value!r}")
        self._normalization = value
        # The normalisation's centre and scale are the training set's median and robust spread.
        self._bounds = (
            None
            if value is None
            else [ValueBounds(mean, std) for mean, std in zip(value["mean"], value["std"], strict=True)]
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops and augmentations: every item's generator depends on the epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def raw_image(self, index: int) -> np.ndarray:
        """Image ``index`` as stored: float32 (C, H, W), physical units, uncropped (for statistics)."""
        image, origin = self.source.read_image(self._checked_index(index))
        self._check_image(image, origin)
        return image

    def validate(self) -> None:
        """Read every item and raise one DataError listing every bad one (slow: reads the whole source)."""
        problems = []
        for index in range(len(self)):
            try:
                self._read(index)
            except DataError as err:
                problems.append(str(err))
        if problems:
            listed = "\n  ".join(problems[:_LISTED_ERRORS])
            more = f"\n  ... and {len(problems) - _LISTED_ERRORS} more" if len(problems) > _LISTED_ERRORS else ""
            raise DataError(
                self.source.location, f"{len(problems)} of {len(self)} items are unusable:\n  {listed}{more}"
            )

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        index, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        if self.normalization is None:
            raise RuntimeError("IscatDataset: set dataset.normalization (compute_normalization(dataset)) first")
        item = self._read(self._checked_index(index))
        generator = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        height, width = item.image.shape[1:]
        labels = item.labels if item.labels is not None else np.zeros((height, width), dtype=np.int64)
        top, left, h, w = self._crop_window(height, width, item.image_origin, generator)
        image = torch.from_numpy(np.ascontiguousarray(item.image[:, top : top + h, left : left + w]))
        crop_labels = torch.from_numpy(np.ascontiguousarray(labels[top : top + h, left : left + w]))
        image = normalize(image, self.normalization)
        if self.augment is not None:
            image, crop_labels = augment(image, crop_labels, self.augment, generator)
        out = {"image": image, "labels": crop_labels, "has_mask": item.labels is not None, "name": item.name}
        if self.contrast_prior is not None:
            out["contrast"] = contrast_channel(image, crop_labels, self.contrast_prior)
        return out

    def __getitems__(self, indices: list) -> list[dict] | DataError:
        """A batch's items for torch's DataLoader, or the DataError of its first bad item, returned rather than
        raised: a DataLoader worker re-raises an exception whose class takes more than a message as a bare
        RuntimeError holding a traceback. ``collate_items`` passes the error on as the batch."""
        try:
            return [self[index] for index in indices]
        except DataError as error:
            return error

    def _checked_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} items")
        return index

    def _check_image(self, image: np.ndarray, origin: str) -> None:
        """The rules of ``iscat-diffusion dataset check`` (``io.pixel_values``) and the channel count."""
        if len(image) != self.channels:
            raise DataError(
                origin,
                f"has {len(image)} image channel(s) but {self.channels} are expected "
                "(check frames_per_channel and the model's image channels)",
            )
        problem = value_problem(image)
        for channel, bounds in enumerate(self._bounds or []):
            problem = problem or bounds.problem(float(image[channel].min()), float(image[channel].max()))
        if problem:
            raise DataError(origin, problem)

    def _read(self, index: int) -> RawItem:
        """Read one item and check it; every problem raises DataError naming the file(s)."""
        item = self.source.read(index)
        self._check_image(item.image, item.image_origin)
        if item.labels is None:
            return item
        if item.labels.shape != item.image.shape[1:]:
            raise DataError(
                item.mask_origin,
                f"has size {item.labels.shape} but its image {item.image_origin} has size {item.image.shape[1:]} "
                "(H, W); an image and its mask must have the same size",
            )
        if item.labels.size and item.labels.max() > self.num_classes:
            raise DataError(
                item.mask_origin,
                f"contains label {item.labels.max()} but num_classes={self.num_classes} "
                f"(labels 1..{self.num_classes}, 0 = background); relabel the mask or train with more classes",
            )
        return RawItem(item.image, item.labels.astype(np.int64), item.name, item.image_origin, item.mask_origin)

    def _crop_window(
        self, height: int, width: int, origin: str, generator: torch.Generator
    ) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop; the whole image when there is no crop size."""
        if self.crop_size is None:
            return 0, 0, height, width
        h, w = self.crop_size
        if h > height or w > width:
            raise DataError(origin, f"image of size ({height}, {width}) is smaller than crop_size ({h}, {w})")
        top = int(torch.randint(height - h + 1, (1,), generator=generator))
        left = int(torch.randint(width - w + 1, (1,), generator=generator))
        return top, left, h, w
