"""Shared pieces of the torch benchmarks: machine description, models, peaks, FLOP counting, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from machine import cpu_model
from napari_iscat_diffusion.diffusion import ConditionalUNet, LoadedModel, ModelConfig, UNetConfig, load_checkpoint
from napari_iscat_diffusion.diffusion.particle_contrast import NUM_QUANTILE_LEVELS, ContrastPrior
from napari_iscat_diffusion.diffusion.schedules import cosine_schedule
from napari_iscat_diffusion.io.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BUNDLED_MODELS = ROOT / "src" / "napari_iscat_diffusion" / "models"
DEFAULT_MODEL_YAML = ROOT / "training" / "configs" / "default_model.yaml"
# The tiny network of tests/tiny_models.py without its attention (which dominates its run time), for --quick smoke runs.
TINY_UNET = UNetConfig(
    num_classes=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(), norm_groups=4
)


def machine_info(device: torch.device | None = None) -> dict:
    """What the numbers were measured on: CPU, cores, threads, library versions and the GPU if one is used."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_results(name: str, machine: dict, results: dict | list, out: Path | None = None) -> Path:
    """Write ``{"machine": ..., "results": ...}`` as JSON to ``out`` or ``benchmarks/results/<name>.json``."""
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"machine": machine, "argv": sys.argv[1:], "results": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def default_model_unet(config: Path = DEFAULT_MODEL_YAML) -> UNetConfig:
    """The architecture of a training config's ``model`` section; by default the bundled default model's
    (training/configs/default_model.yaml)."""
    import yaml  # the train extra; imported here so that the other helpers work without it

    section = yaml.safe_load(config.read_text())["model"]
    return UNetConfig(**{key: value for key, value in section.items() if key in UNetConfig.__dataclass_fields__})


def fresh_model(unet: UNetConfig, seed: int = 0) -> LoadedModel:
    """A freshly initialised v-prediction model on a cosine schedule, with a randomised (non-zero) output layer.

    A network with a contrast channel gets a prior of peaks spread evenly over -1..1 for every class: what it draws
    does not change the arithmetic a benchmark times.
    """
    torch.manual_seed(seed)
    net = ConditionalUNet(unet)
    with torch.no_grad():  # the zero-initialised output layer would make every forward trivially cheap to check
        net.conv_out.weight.normal_(std=0.02)
    spread = np.linspace(-1.0, 1.0, NUM_QUANTILE_LEVELS)
    config = ModelConfig(
        unet=unet,
        schedule=cosine_schedule(1000).to_config(),
        parameterization="v",
        normalization={"mean": [0.0] * unet.image_channels, "std": [1.0] * unet.image_channels},
        particle_contrast=(
            ContrastPrior(1.0, 2.0, {label: spread for label in range(1, unet.num_classes + 1)})
            if unet.contrast_channel
            else None
        ),
    )
    return LoadedModel(net.eval().requires_grad_(False), config, None, "", {})


def bundled_model_path() -> Path | None:
    """The bundled default checkpoint, if the package holds one."""
    found = sorted(BUNDLED_MODELS.glob("*.safetensors"))
    return found[0] if found else None


def benchmark_model(quick: bool, path: Path | None = None) -> tuple[LoadedModel, str]:
    """The model a benchmark runs and a description: ``path``, else the bundled model, else a fresh default one.

    ``quick`` takes the tiny test network instead of a fresh default-config one.
    """
    path = path or (None if quick else bundled_model_path())
    if path is not None:
        return load_checkpoint(path), f"checkpoint {path.name}"
    if quick:
        return fresh_model(TINY_UNET), "tiny network (--quick)"
    return fresh_model(default_model_unet()), "freshly initialised default-config network"


def guided_steps(sigmas: torch.Tensor, interval: tuple[float, float]) -> int:
    """How many of a sampler's network evaluations (at ``sigmas[:-1]``) fall inside the guidance interval."""
    low, high = interval
    return sum(1 for sigma in sigmas[:-1].tolist() if low < sigma <= high)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(module: torch.nn.Module, *args: torch.Tensor) -> int:
    """FLOPs of one forward pass, counted by ``FlopCounterMode``.

    Attention runs through the math backend while counting: FlopCounterMode has no formula for the
    fused CPU kernel and would count it as zero.
    """
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def matmul_peak_gflops(
    device: torch.device, size: int = 2048, seconds: float = 2.0, dtype: torch.dtype = torch.float32
) -> float:
    """Measured matrix-multiply throughput in ``dtype`` in GFLOP/s: the practical peak that FLOP/s figures are
    compared with."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def blob_mask(size: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """A size x size label mask with one 5x5 particle per 40x40 pixels on average, classes drawn at random."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(max(1, size * size // 1600)):
        row, col = rng.integers(0, size - 5, 2)
        mask[row : row + 5, col : col + 5] = rng.integers(1, num_classes + 1)
    return mask
