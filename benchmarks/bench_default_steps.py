"""Sampling time with a checkpoint's own sampling defaults against the full sigma grid at a fixed step count.

Generates the same masks with the same seeds and the checkpoint's guidance, alternating between
DPM-Solver++ at ``--baseline-steps`` from the schedule's highest noise level (what every checkpoint did
before ``sampling_sigma_max`` and ``default_steps``) and the checkpoint's defaults (its grid start and
step count). Prints the median seconds per image of each, their ratio and the network passes each
makes; writes ``benchmarks/results/default_steps.json`` with the machine's description.

    python benchmarks/bench_default_steps.py            # bundled model, 256x256, against 20 steps
    python benchmarks/bench_default_steps.py --quick    # tiny network, 64x64, 1 repeat
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from common import benchmark_model, blob_mask, guided_steps, machine_info, write_results
from napari_iscat_diffusion.diffusion import LoadedModel, generate, resolve_device
from napari_iscat_diffusion.diffusion.guidance import EVERY_NOISE_LEVEL

SAMPLER = "dpmpp_2m"


def network_passes(model: LoadedModel, steps: int) -> int:
    """Network passes per image of DPM-Solver++ at ``steps`` steps with the model's guidance and its interval."""
    config = model.config
    if config.default_guidance == 1.0 and all(w == 1.0 for w in config.default_class_guidance.values()):
        return steps  # unguided: the conditional branch alone at every step
    interval = model.config.default_guidance_interval or EVERY_NOISE_LEVEL
    return steps + guided_steps(model.sampling_sigmas(SAMPLER, steps), interval)


def main() -> None:
    """Time both settings side by side, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny network, 64x64 masks, 1 repeat")
    parser.add_argument("--size", type=int, default=None, help="mask side in px [256]")
    parser.add_argument("--baseline-steps", type=int, default=20, help="DPM-Solver++ steps on the full grid [20]")
    parser.add_argument("--batch", type=int, default=2, help="images per generate call [2]")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each setting [3]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled model]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    device = resolve_device(args.device)
    model, description = benchmark_model(args.quick, args.model)
    full_grid = dataclasses.replace(model, config=dataclasses.replace(model.config, sampling_sigma_max=None))
    settings = {
        "full grid": (full_grid, args.baseline_steps),
        "checkpoint defaults": (model, model.default_steps(SAMPLER)),
    }
    masks = [blob_mask(size, model.config.num_classes, seed=i) for i in range(args.batch)]

    def run(setting: LoadedModel, steps: int) -> float:
        start = time.perf_counter()
        generate(masks, setting, sampler=SAMPLER, steps=steps, device=device, batch_size=args.batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.batch

    run(*settings["checkpoint defaults"])  # warm-up: kernel selection and allocator, not part of either time
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):  # alternate, so that drifts in the machine's load touch both settings alike
        for name, setting in settings.items():
            seconds[name].append(run(*setting))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {
        "model": description,
        "size": size,
        "batch": args.batch,
        "device": str(device),
        "steps": {name: steps for name, (_, steps) in settings.items()},
        "sigma_start": {name: float(m.sampling_sigmas(SAMPLER, steps)[0]) for name, (m, steps) in settings.items()},
        "network_passes_per_image": {name: network_passes(*setting) for name, setting in settings.items()},
        "seconds_per_image": seconds,
        "median_seconds_per_image": medians,
        "speedup": medians["full grid"] / medians["checkpoint defaults"],
    }
    lines = [
        f"  {name}: {result['steps'][name]} steps from sigma {result['sigma_start'][name]:.4g}, "
        f"{result['network_passes_per_image'][name]} network passes, {medians[name]:.2f} s per image"
        for name in settings
    ]
    print(
        f"{description}, {size}x{size}, batch {args.batch}, DPM-Solver++ with the checkpoint's guidance, {device}:\n"
        + "\n".join(lines)
        + f"\n  speed-up {result['speedup']:.2f}x"
    )
    write_results("default_steps", machine_info(device), result, args.out)


if __name__ == "__main__":
    main()
