"""Sampling time with guidance at every step against guidance in a limited interval of noise levels.

Generates the same masks with the same seeds, alternating between guidance at every step and guidance
only inside ``--interval`` (the other steps run the conditional branch alone, one network pass instead
of two). Prints the median seconds per image of each, their ratio, and how many network passes each
makes; writes ``benchmarks/results/guidance_interval.json`` with the machine's description.

    python benchmarks/bench_guidance_interval.py                 # bundled model, 256x256, 20 DPM-Solver++ steps
    python benchmarks/bench_guidance_interval.py --quick         # tiny network, 64x64, 4 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import benchmark_model, blob_mask, guided_steps, machine_info, write_results
from napari_iscat_diffusion.diffusion import generate, resolve_device
from napari_iscat_diffusion.diffusion.guidance import EVERY_NOISE_LEVEL, parse_guidance_interval


def main() -> None:
    """Time both settings side by side, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny network, 64x64 masks, 4 steps, 1 repeat")
    parser.add_argument("--size", type=int, default=None, help="mask side in px [256]")
    parser.add_argument("--steps", type=int, default=None, help="DPM-Solver++ steps [20]")
    parser.add_argument("--batch", type=int, default=2, help="images per generate call [2]")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each setting [3]")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--interval", type=parse_guidance_interval, default=(2.0, 45.0), help="LOW,HIGH [2,45]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled model]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = args.size or (64 if args.quick else 256)
    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    device = resolve_device(args.device)
    model, description = benchmark_model(args.quick, args.model)
    masks = [blob_mask(size, model.config.num_classes, seed=i) for i in range(args.batch)]
    settings = {"every step": EVERY_NOISE_LEVEL, "interval": args.interval}
    sigmas = model.sampling_sigmas("dpmpp_2m", steps)

    def run(interval: tuple[float, float]) -> float:
        start = time.perf_counter()
        generate(
            masks, model, steps=steps, guidance=args.guidance, class_guidance={}, guidance_interval=interval,
            device=device, batch_size=args.batch,
        )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / args.batch

    run(EVERY_NOISE_LEVEL)  # warm-up: kernel selection and allocator, not part of either setting's time
    seconds: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):  # alternate, so that drifts in the machine's load touch both settings alike
        for name, interval in settings.items():
            seconds[name].append(run(interval))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    passes = {name: steps + guided_steps(sigmas, interval) for name, interval in settings.items()}
    result = {
        "model": description,
        "size": size,
        "batch": args.batch,
        "steps": steps,
        "guidance": args.guidance,
        "interval": list(args.interval),
        "device": str(device),
        "seconds_per_image": seconds,
        "median_seconds_per_image": medians,
        "network_passes_per_image": passes,
        "speedup": medians["every step"] / medians["interval"],
    }
    print(
        f"{description}, {size}x{size}, batch {args.batch}, {steps} DPM-Solver++ steps, guidance {args.guidance}, "
        f"{device}:\n"
        f"  every step: {medians['every step']:.2f} s per image ({passes['every step']} network passes)\n"
        f"  interval {args.interval[0]:g}-{args.interval[1]:g}: {medians['interval']:.2f} s per image "
        f"({passes['interval']} network passes)\n"
        f"  speed-up {result['speedup']:.2f}x"
    )
    write_results("guidance_interval", machine_info(device), result, args.out)


if __name__ == "__main__":
    main()
