"""Generation inside the plugin's napari thread worker against a direct ``generate()`` call, same settings.

One napari plugin gave up on thread workers because torch ran much slower inside them; this measures
the plugin's own path (``_widgets._job.Job``: a napari function worker with per-step progress relayed
to the main thread, whose Qt event loop keeps running) against calling ``generate()`` on the main
thread. Prints the ratio and writes ``benchmarks/results/worker.json`` with the machine description.

    QT_QPA_PLATFORM=offscreen python benchmarks/bench_worker.py [--checkpoint FILE] [--size 128] [--steps 20]

Without --checkpoint it uses the bundled default model, or else an untrained U-Net of the default
architecture (timing depends on the architecture, not on the weights).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine_info
from napari_iscat_diffusion.diffusion import (
    ConditionalUNet,
    ModelConfig,
    UNetConfig,
    generate,
    linear_schedule,
    load_checkpoint,
    resolve_device,
    save_checkpoint,
)
from napari_iscat_diffusion.models import bundled_checkpoints


def _model(checkpoint: Path | None, folder: Path):
    if checkpoint is None and bundled_checkpoints():
        checkpoint = next(iter(bundled_checkpoints().values()))
    if checkpoint is None:
        unet = UNetConfig(num_classes=3)
        config = ModelConfig(
            unet=unet,
            schedule=linear_schedule(1000).to_config(),
            parameterization="v",
            normalization={"mean": [0.0], "std": [0.01]},
        )
        checkpoint = folder / "untrained.safetensors"
        save_checkpoint(checkpoint, ConditionalUNet(unet), config)
    return load_checkpoint(checkpoint)


def _mask(size: int, num_classes: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    rng = np.random.default_rng(0)
    for label in range(1, num_classes + 1):
        for y, x in rng.integers(4, size - 4, size=(4, 2)):
            mask[y - 2 : y + 3, x - 2 : x + 3] = label
    return mask


def _in_worker(app, run) -> float:
    """Seconds from starting a Job until its on_done ran on the main thread, with the event loop spinning."""
    from napari_iscat_diffusion._widgets._job import Job

    finished = []
    start = time.perf_counter()
    Job(
        lambda report: run(lambda p: report(p.completed, p.total, "bench")),
        description="bench",
        cancel_exception=KeyboardInterrupt,
        on_step=lambda *args: None,
        on_done=lambda outcome: finished.append((time.perf_counter(), outcome)),
    )
    while not finished:
        app.processEvents()
        time.sleep(0.001)
    end, outcome = finished[0]
    if outcome.error is not None:
        raise outcome.error
    return end - start


def main() -> None:
    """Time both paths (alternating, after a warm-up of each) and print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--size", type=int, default=128, help="mask side in pixels [128]")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps [20]")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path (median reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "worker.json")
    args = parser.parse_args()

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as folder:
        model = _model(args.checkpoint, Path(folder))
    mask = _mask(args.size, model.config.num_classes)

    def run(callback=None) -> np.ndarray:
        return generate(
            mask, model, sampler=args.sampler, steps=args.steps, seed=0, device=args.device, callback=callback
        )

    run()  # warm-up: first-call allocations and kernel selection
    _in_worker(app, run)
    direct, worker = [], []
    for _ in range(args.repeats):  # alternate, so that a change in machine load hits both alike
        start = time.perf_counter()
        run(lambda p: None)
        direct.append(time.perf_counter() - start)
        worker.append(_in_worker(app, run))
    ratio = float(np.median(worker) / np.median(direct))
    device = resolve_device(args.device)
    machine = machine_info(device) | {"device": str(device)}
    settings = {k: getattr(args, k) for k in ("size", "steps", "sampler", "repeats")}
    settings["model"] = model.summary()
    results = {
        "direct_median_s": float(np.median(direct)),
        "worker_median_s": float(np.median(worker)),
        "direct_s": direct,
        "worker_s": worker,
        "worker_over_direct": ratio,
    }
    print(f"direct generate(): {np.median(direct):.3f} s, in the napari thread worker: {np.median(worker):.3f} s")
    print(f"worker / direct = {ratio:.2f} (median of {args.repeats}; {args.size}x{args.size}, {args.steps} steps)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "settings": settings, "results": results}, indent=2) + "\n")
    print(f"machine: {machine['cpu_model']}, {machine['device']}, torch {machine['torch']}; wrote {args.out}")


if __name__ == "__main__":
    main()
