"""Peak memory of ``generate()`` for 256, 1024 and 2048 pixel masks, tiled and untiled.

Each case runs in a fresh process (peak RSS is a per-process high-water mark): the process loads
the model, notes its resident memory, runs ``generate`` with one sampler step and guidance (so the
network sees a batch of two) and reports its peak RSS and, on CUDA, ``torch.cuda.max_memory_allocated``.
The model is ``--model``, else the bundled default model, else a freshly initialised default-config
network (memory and time do not depend on the weights). Results go to ``benchmarks/results/memory.json``.

    python benchmarks/bench_memory.py                 # 256/1024/2048 tiled, untiled up to 1024 on the CPU
    python benchmarks/bench_memory.py --quick         # tiny network, 64-pixel tiles, 256 and 2048 tiled, 256 untiled
    python benchmarks/bench_memory.py --untiled-max 2048 --device cuda

Untiled 2048 is skipped on the CPU by default: its activations alone need about 7 GB per image in
the batch, and self-attention over 512x512 tokens takes hours there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import benchmark_model, blob_mask, machine_info, peak_rss_mb, write_results
from napari_iscat_diffusion.diffusion import generate, resolve_device
from napari_iscat_diffusion.diffusion.tiling import auto_tile_size


def run_case(size: int, tiled: bool, args: argparse.Namespace) -> dict:
    """Generate one image in this process and report its memory and time."""
    device = resolve_device(args.device)
    model, description = benchmark_model(args.quick, args.model)
    model.to(device)
    mask = blob_mask(size, model.config.num_classes)
    baseline = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    tile_size = (args.tile_size or (64 if args.quick else auto_tile_size(model.config.unet))) if tiled else None
    generate(mask, model, steps=args.steps, guidance=args.guidance, device=device, tile_size=tile_size)
    seconds = time.perf_counter() - start
    result = {
        "size": size,
        "tiled": tiled,
        "tile_size": tile_size,
        "steps": args.steps,
        "guidance": args.guidance,
        "model": description,
        "seconds": seconds,
        "rss_after_load_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    """Run every case in its own process, print a table and save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny network, 64-pixel tiles, sizes 256 and 2048, untiled up to 256"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="mask sides (default 256 1024 2048)")
    parser.add_argument("--untiled-max", type=int, default=None, help="largest side run untiled (default 1024)")
    parser.add_argument(
        "--tile-size", type=int, default=None, help="tile side (default: the model's auto size; 64 with --quick)"
    )
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint")
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per case before it is recorded as too slow"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--case", nargs=2, metavar=("SIZE", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case is not None:
        print(json.dumps(run_case(int(args.case[0]), args.case[1] == "1", args)))
        return
    sizes = args.sizes or ([256, 2048] if args.quick else [256, 1024, 2048])
    untiled_max = args.untiled_max or (256 if args.quick else 1024)
    passthrough = [a for a in sys.argv[1:] if a != "--case"]
    results = []
    for size in sizes:
        for tiled in (True, False):
            if not tiled and size > untiled_max:
                results.append({"size": size, "tiled": False, "skipped": f"larger than --untiled-max {untiled_max}"})
                print(f"{size:5d} untiled: skipped (larger than --untiled-max {untiled_max})")
                continue
            command = [sys.executable, __file__, *passthrough, "--case", str(size), "1" if tiled else "0"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
            except subprocess.TimeoutExpired:
                results.append({"size": size, "tiled": tiled, "skipped": f"took longer than {args.timeout:g} s"})
                print(f"{size:5d} {'tiled' if tiled else 'untiled'}: longer than {args.timeout:g} s")
                continue
            except subprocess.CalledProcessError as err:  # out of memory shows up here
                results.append({"size": size, "tiled": tiled, "failed": err.stderr.strip().splitlines()[-1:]})
                print(f"{size:5d} {'tiled' if tiled else 'untiled'}: failed: {err.stderr.strip()[-300:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            cuda = (
                f", CUDA peak {result['cuda_peak_allocated_mb']:.0f} MiB" if "cuda_peak_allocated_mb" in result else ""
            )
            print(
                f"{size:5d} {'tiled' if tiled else 'untiled'}: peak RSS {result['peak_rss_mb']:.0f} MiB "
                f"(after model load {result['rss_after_load_mb']:.0f} MiB){cuda}, {result['seconds']:.1f} s "
                f"for {args.steps} step(s) [{result['model']}]"
            )
    write_results("memory", machine_info(resolve_device(args.device)), results, args.out)


if __name__ == "__main__":
    main()
