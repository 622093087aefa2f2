"""Latency of the first image: what a user waits after opening the Generate widget and clicking Generate.

Runs in a fresh process and times, separately, importing the diffusion core, loading the model
(the bundled default checkpoint when the package holds one, else a freshly initialised
default-config network, or ``--model``), the first ``generate()`` call (which pays one-time costs:
kernel selection, allocator warm-up) and a second identical call. Results go to
``benchmarks/results/first_image.json``.

    python benchmarks/bench_first_image.py            # 256x256 mask, the model's sampler, steps and guidance
    python benchmarks/bench_first_image.py --quick    # tiny network, 64x64, 2 steps
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

start_import = time.perf_counter()
# ruff: noqa: E402 -- the imports are what the first timer measures
import torch

from common import benchmark_model, blob_mask, machine_info, peak_rss_mb, write_results
from napari_iscat_diffusion.diffusion import generate, resolve_device

import_seconds = time.perf_counter() - start_import


def main() -> None:
    """Time model loading, the first and a second image, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny network, 64x64 mask, 2 steps")
    parser.add_argument("--size", type=int, default=None, help="mask side (default 256)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 256)
    device = resolve_device(args.device)

    start = time.perf_counter()
    model, description = benchmark_model(args.quick, args.model)
    model.to(device)
    load_seconds = time.perf_counter() - start
    sampler, steps = model.sampler_and_steps(args.sampler, 2 if args.quick and args.steps is None else args.steps)
    guidance = model.config.default_guidance if args.guidance is None else args.guidance

    mask = blob_mask(size, model.config.num_classes)
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        generate(mask, model, sampler=sampler, steps=steps, guidance=guidance, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - start)
    result = {
        "model": description,
        "size": size,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "device": str(device),
        "import_seconds": import_seconds,
        "load_seconds": load_seconds,
        "first_generate_seconds": timings[0],
        "second_generate_seconds": timings[1],
        "first_image_seconds": import_seconds + load_seconds + timings[0],
        "peak_rss_mb": peak_rss_mb(),
    }
    print(
        f"{description}, {size}x{size}, {steps} {sampler} steps, guidance {guidance:g}, {device}:\n"
        f"  import {import_seconds:.2f} s + load {load_seconds:.2f} s + first generate {timings[0]:.2f} s "
        f"= first image after {result['first_image_seconds']:.2f} s; second generate {timings[1]:.2f} s"
    )
    write_results("first_image", machine_info(device), result, args.out)


if __name__ == "__main__":
    main()
