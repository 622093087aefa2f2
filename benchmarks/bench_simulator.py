"""Speed of the iSCAT physics simulator: milliseconds per image/mask pair on one CPU core.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_simulator.py``. The process pins itself to one core
(where the OS allows it), times ``--repeats`` pairs per case after one warm-up call (which builds the cached PSF
table, reported separately) and writes ``benchmarks/results/simulator.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from machine import cpu_model
from napari_iscat_diffusion.iscat.simulate import SimulationParameters, simulate

CASES: dict[str, dict] = {
    "256x256, 30 particles": {"image_size": (256, 256), "particles_per_image": (30, 30)},
    "512x512, 100 particles": {"image_size": (512, 512), "particles_per_image": (100, 100)},
    "256x256, 30 particles, 5-plane focal stack": {
        "image_size": (256, 256),
        "particles_per_image": (30, 30),
        "focal_planes_nm": (-400.0, -200.0, 0.0, 200.0, 400.0),
    },
}


def _pin_to_one_core() -> int | None:
    """Pin this process to one CPU core; returns the core or None where affinity cannot be set."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def bench_case(params: SimulationParameters, repeats: int) -> dict:
    """Time one warm-up call and ``repeats`` further calls (distinct seeds) of :func:`simulate`."""
    start = time.perf_counter()
    simulate(params, 0)
    first_ms = 1e3 * (time.perf_counter() - start)
    times = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        result = simulate(params, seed)
        times.append(1e3 * (time.perf_counter() - start))
    return {
        "median_ms": float(np.median(times)),
        "min_ms": float(np.min(times)),
        "max_ms": float(np.max(times)),
        "first_call_ms": first_ms,
        "repeats": repeats,
        "particles_last_pair": len(result.particles),
        "image_shape": list(result.image.shape),
    }


def main() -> None:
    """Run every case and print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed pairs per case (median reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "simulator.json")
    args = parser.parse_args()

    core = _pin_to_one_core()
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "numpy": np.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "pinned_core": core,
        "cores_used": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    results = {}
    for name, overrides in CASES.items():
        results[name] = bench_case(SimulationParameters(**overrides), args.repeats)
        r = results[name]
        timing = f"{r['median_ms']:.1f} ms per pair (median of {r['repeats']}; first call {r['first_call_ms']:.0f} ms)"
        print(f"{name}: {timing}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"machine: {machine['cpu_model']}, numpy {machine['numpy']}, {machine['cores_used']} core(s)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
