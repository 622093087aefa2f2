"""Tiny, fast training runs for the training tests: simulator data at 40 px, 32 px crops, a tiny U-Net."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import torch
from tests.tiny_models import TINY_UNET
from training.config import TrainConfig, load_config
from training.data import build_data
from training.trainer import Trainer

from napari_iscat_diffusion.diffusion.unet import ConditionalUNet

REPO = Path(__file__).resolve().parent.parent

# Attention is left out (attention_levels=[]): it triples the step time of this tiny network on a CPU.
TINY_OVERRIDES = [
    "data.simulator={image_size: [40, 40], particles_per_image: [1, 4]}",
    "data.crop_size=[32, 32]",
    "data.simulator_train_items=64",
    "data.simulator_val_items=8",
    "data.normalization_images=16",
    "data.num_workers=0",
    "model.num_classes=3",
    *(f"model.{key}={list(value) if isinstance(value, tuple) else value}" for key, value in TINY_UNET.items()),
    "model.attention_levels=[]",
    "train.batch_size=4",
    "train.steps=8",
    "optim.lr=2e-3",
    "optim.warmup_steps=2",
    "ema.half_life_images=64",
    "log.every=2",
    "log.val_every=0",
    "log.val_timesteps=4",
    "log.sample_every=0",
    "log.num_samples=2",
    "log.sample_steps=2",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=4",
]


def tiny_overrides(run_dir: str | os.PathLike, *extra: str) -> list[str]:
    """Command-line overrides for a tiny run writing to ``run_dir``; ``extra`` overrides come last and win."""
    return [f"run_dir={run_dir}", *TINY_OVERRIDES, *extra]


def tiny_config(run_dir: str | os.PathLike, *extra: str) -> TrainConfig:
    """The checked config of a tiny run (see ``tiny_overrides``)."""
    return load_config(None, tiny_overrides(run_dir, *extra))


def tiny_trainer(config: TrainConfig) -> Trainer:
    """A single-process Trainer for ``config``, built as training/train.py builds it."""
    data = build_data(config)
    torch.manual_seed(config.seed)
    model = ConditionalUNet(config.unet_config())
    return Trainer(model, config, data.train_loader, data.val_loader, pixel_size_nm=data.pixel_size_nm)


def run_python(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root with one thread per process; returns the finished process."""
    # The repository first, then the caller's path (which holds src/ where the package is not installed).
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def contrast_tiff_pairs(root: Path, count: int, bad: int, bad_image: np.ndarray | None = None) -> Path:
    """``count`` pairs of contrast-like images (noise of 0.01 around 0); pair ``bad``'s image is ``bad_image``,
    or the normal one with a pixel of 1e6 (1e8 robust spreads out, no magnitude problem) when it is None."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for index in range(count):
        mask = np.zeros((40, 40), np.uint8)
        mask[5:9, 5:9] = 1
        image = rng.normal(0, 0.01, (40, 40)).astype(np.float32)
        if index == bad and bad_image is not None:
            image = bad_image
        elif index == bad:
            image[20, 20] = 1e6
        colour = image.ndim == 3 and image.shape[-1] in (3, 4)  # (H, W, 3): RGB; (3, H, W): three planes
        tifffile.imwrite(root / f"p{index}.tif", image, photometric="rgb" if colour else "minisblack")
        tifffile.imwrite(root / f"p{index}_mask.tif", mask)
    return root
