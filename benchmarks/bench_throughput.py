"""Generation throughput on one device: images per second and the fraction of the device's matmul peak reached.

Issue 7's GPU measurement: the project's own pipeline (``generate()``: the model's default sampler on its
sigma grid, classifier-free guidance as one batched forward inside the guidance interval) at 256 px, 20 steps,
guidance 1.5, batch 1 and 64, in the precision ``generate`` picks (bf16 on CUDA, fp32 on the CPU). For each
size and batch: one warm-up run, then the median of ``--repeats`` timed runs; seconds per image, images per
second, the network's FLOPs per image (one forward counted with ``FlopCounterMode`` times the passes the
guidance interval costs), the FLOP/s achieved and their fraction of a matrix product's measured peak in the same
precision on the same device. Written to ``benchmarks/results/throughput.json`` with the machine (GPU name
included).

The model is the bundled checkpoint unless ``--model`` names one, or ``--unet-config`` takes the architecture of
a training config with fresh weights (speed does not depend on them), e.g. the wider GPU config:

    python benchmarks/bench_throughput.py --device cuda                        # 256 px, batch 1 and 64
    python benchmarks/bench_throughput.py --device cuda --unet-config training/configs/default_model_gpu.yaml
    python benchmarks/bench_throughput.py --quick                              # CPU smoke run: 64 px, 2 steps
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    benchmark_model,
    blob_mask,
    count_flops,
    default_model_unet,
    fresh_model,
    guided_steps,
    machine_info,
    matmul_peak_gflops,
    write_results,
)
from napari_iscat_diffusion.diffusion import LoadedModel, generate, resolve_device
from napari_iscat_diffusion.diffusion.guidance import check_guidance_interval

GUIDANCE = 1.5
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def config_model(config: Path) -> LoadedModel:
    """A freshly initialised network of a training config's architecture, with the guidance interval and sampling
    start its export writes into the checkpoint, so that it runs the passes a trained one would."""
    import yaml  # the bench extra

    export = yaml.safe_load(config.read_text()).get("export") or {}
    model = fresh_model(default_model_unet(config))
    if export.get("default_guidance_interval") is not None:
        model.config.default_guidance_interval = tuple(export["default_guidance_interval"])
    model.config.sampling_sigma_max = export.get("sampling_sigma_max")
    return model


def network_passes(model: LoadedModel, steps: int) -> int:
    """Network passes per image for ``steps`` steps of the model's default sampler with guidance ``GUIDANCE``:
    two on every evaluation inside the model's guidance interval, one elsewhere."""
    sampler, steps = model.sampler_and_steps(None, steps)
    sigmas = model.sampling_sigmas(sampler, steps)
    interval = check_guidance_interval(model.config.default_guidance_interval)
    evaluations = len(sigmas) - 1
    return evaluations + guided_steps(sigmas, interval)


def forward_flops(model: LoadedModel, size: int) -> int:
    """FLOPs of one network forward of one ``size`` x ``size`` image (on the CPU, in fp32)."""
    unet = model.config.unet
    x = torch.randn(1, unet.image_channels, size, size)
    cond = torch.zeros(1, unet.condition_channels, size, size)
    return count_flops(model.to("cpu").net, x, torch.full((1,), 500.0), cond)


def time_case(model: LoadedModel, size: int, batch: int, steps: int, repeats: int, device: str, precision: str) -> list:
    """Seconds per batch of ``repeats`` timed runs after one warm-up (not counted)."""
    masks = np.stack([blob_mask(size, model.config.num_classes, seed) for seed in range(batch)])
    seconds = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        # generate returns numpy arrays, so every run ends with the device synchronised.
        generate(
            masks,
            model,
            steps=steps,
            guidance=GUIDANCE,
            class_guidance={},
            batch_size=batch,
            device=device,
            precision=precision,
        )
        if run:
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    """Measure every size and batch; print a table and save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 1 and 2, 2 steps, 1 repeat, tiny network")
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled]")
    parser.add_argument("--unet-config", type=Path, default=None, help="a training config: its architecture, fresh")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISION_DTYPES))
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides [256]")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes [1 64]")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps [20]")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case [3]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model is not None and args.unet_config is not None:
        parser.error("give --model or --unet-config, not both")
    sizes = args.sizes or ([64] if args.quick else [256])
    batches = args.batches or ([1, 2] if args.quick else [1, 64])
    steps = args.steps or (2 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)
    if min(sizes) < 16 or min(batches) < 1 or steps < 1 or repeats < 1:
        parser.error("sizes must be >= 16 and batches, steps, repeats >= 1")

    device = resolve_device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if args.unet_config is not None:
        model, description = config_model(args.unet_config), f"fresh {args.unet_config.name} network"
    else:
        model, description = benchmark_model(args.quick, args.model)
    peak = matmul_peak_gflops(
        device,
        size=8192 if device.type == "cuda" else 2048,
        seconds=0.5 if args.quick else 3.0,
        dtype=PRECISION_DTYPES[precision],
    )
    passes = network_passes(model, steps)
    print(f"{description} on {device} in {precision}; {precision} matmul peak {peak:.1f} GFLOP/s")
    print(f"{steps} steps, guidance {GUIDANCE}: {passes} network passes per image")
    machine = machine_info(device) | {"matmul_peak_gflops": peak, "matmul_dtype": precision}
    results = []
    for size in sizes:
        flops_per_image = forward_flops(model, size) * passes
        for batch in batches:
            seconds = time_case(model, size, batch, steps, repeats, str(device), precision)
            per_image = statistics.median(seconds) / batch
            achieved = flops_per_image / per_image / 1e9
            results.append(
                {
                    "model": description,
                    "unet": model.config.unet.to_dict(),
                    "device": str(device),
                    "precision": precision,
                    "size": size,
                    "batch": batch,
                    "steps": steps,
                    "guidance": GUIDANCE,
                    "network_passes_per_image": passes,
                    "gflop_per_image": flops_per_image / 1e9,
                    "seconds_per_batch": seconds,
                    "seconds_per_image": per_image,
                    "images_per_second": 1 / per_image,
                    "achieved_gflops": achieved,
                    "fraction_of_matmul_peak": achieved / peak,
                }
            )
            print(
                f"  {size} px, batch {batch}: {per_image:.4f} s/image, {1 / per_image:.1f} images/s, "
                f"{achieved:.1f} GFLOP/s ({achieved / peak:.1%} of the matmul peak)"
            )
            # After every case, so that a run stopped part-way keeps what it measured.
            write_results("throughput", machine, results, args.out)


if __name__ == "__main__":
    main()
