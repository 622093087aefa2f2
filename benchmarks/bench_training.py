"""Training throughput: images per second for one process and for 2-process DDP, and the scaling efficiency.

Run on a quiet machine with ``python benchmarks/bench_training.py`` (``--quick`` for a smoke run with the
tiny test network). Each case runs the real entry point in a subprocess: ``python -m training.train`` for one
process, ``torchrun --standalone --nproc_per_node=2 training/train.py`` for DDP (gloo on the CPU, NCCL on
GPUs), with one thread per process (OMP_NUM_THREADS=1), so 2 processes use 2 cores. The batch per process is
fixed (weak scaling): the scaling efficiency is the 2-process rate / (2 x the 1-process rate). Validation,
sample grids and intermediate checkpoints are off; data are simulated in the training process
(data.num_workers=0), so the rate includes data generation. The rate of a case is the median of the
``images_per_s`` that rank 0 logs to metrics.jsonl every ``--window`` steps, the first window (warm-up)
left out. Results go to ``benchmarks/results/training.json`` with the machine description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import ROOT, machine_info, write_results

DEFAULT_CONFIG = ROOT / "training" / "configs" / "simulator_small.yaml"
QUICK = [
    "data.simulator={image_size: [40, 40], particles_per_image: [1, 4]}",
    "data.crop_size=[32, 32]",
    "data.simulator_val_items=4",
    "data.normalization_images=8",
    "model.base_channels=8",
    "model.channel_mults=[1, 2]",
    "model.attention_levels=[1]",
    "model.num_heads=2",
    "model.norm_groups=4",
    "train.batch_size=4",
]


def run_case(processes: int, config: Path, overrides: list[str], window: int, windows: int) -> dict:
    """Train ``(windows + 1) * window`` steps with ``processes`` processes; returns the measured rates."""
    with tempfile.TemporaryDirectory() as run_dir:
        settings = [
            f"run_dir={run_dir}",
            # A config may export elsewhere (default_model.yaml writes into the package): keep it in the run.
            f"export.path={run_dir}/model.safetensors",
            f"train.steps={(windows + 1) * window}",
            f"log.every={window}",
            "log.val_every=0",
            "log.sample_every=0",
            "log.progress=false",
            "log.tensorboard=false",
            "checkpoint.every=0",
            "data.num_workers=0",
            *overrides,
        ]
        if processes == 1:
            launcher = ["-m", "training.train"]
        else:
            launcher = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={processes}",
                "training/train.py",
            ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, *launcher, "--config", str(config), *settings],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{processes}-process training failed:\n{done.stderr[-3000:]}")
        entries = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [entry["images_per_s"] for entry in entries if "images_per_s" in entry][1:]
    return {"processes": processes, "images_per_s": statistics.median(rates), "window_rates": rates}


def main() -> None:
    """Run the 1- and 2-process cases and print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (per-process batch)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--window", type=int, default=10, help="optimiser steps per logged rate")
    parser.add_argument("--windows", type=int, default=3, help="measured windows after the warm-up window")
    parser.add_argument("--quick", action="store_true", help="tiny network and crops: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default benchmarks/results/training.json)")
    parser.add_argument("overrides", nargs="*", help="further config overrides, e.g. train.batch_size=8")
    args = parser.parse_args()

    overrides = [*(QUICK if args.quick else []), f"train.device={args.device}", *args.overrides]
    cases = [1, 2]
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        cases = [1]  # DDP on GPUs needs one GPU per process
    results = {"config": str(args.config), "overrides": overrides, "threads_per_process": 1, "cases": []}
    for processes in cases:
        case = run_case(processes, args.config, overrides, args.window, args.windows)
        results["cases"].append(case)
        print(f"{processes} process(es): {case['images_per_s']:.1f} images/s (windows: {case['window_rates']})")
    if len(results["cases"]) == 2:
        single, double = (case["images_per_s"] for case in results["cases"])
        results["scaling_efficiency"] = double / (2 * single)
        print(f"scaling efficiency with 2 processes: {results['scaling_efficiency']:.0%}")
    device = torch.device("cuda", 0) if args.device == "cuda" else None
    write_results("training", {**machine_info(device), "quick": args.quick}, results, args.out)


if __name__ == "__main__":
    main()
