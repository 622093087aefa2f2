"""Whether generated particles have the peak contrasts they were given (models with a contrast channel).

Each held-out simulator image (the evaluation's, seeds from 3e9) gives its particles' signed peak contrasts,
measured as training measures them (``evaluation.peaks.measure_peaks``, physical units). A model with a contrast
channel generates an image for the same mask with those contrasts given (``generate(..., particle_contrast=)``)
and with its own drawn ones; a model without the channel generates one image (it cannot be told). Every generated
particle's peak is measured the same way. Prints, per class, the correlation between the physics' peaks and the
generated ones, the slope of the generated over the physics' (below 1: drawn towards the class's typical peak),
the median of |generated - physics| / |physics|, and the fraction of particles whose peak has the
physics' sign: given contrasts should give a correlation near 1, drawn ones (and a model without the channel)
near 0. Unguided (guidance 1), the use given contrasts are for: guidance extrapolates them. Writes
``benchmarks/results/contrast_fidelity.json`` with the machine's description.

    python benchmarks/contrast_fidelity.py --checkpoints runs/contrast.safetensors [runs/plain.safetensors] --n 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import bundled_model_path, machine_info, write_results
from napari_iscat_diffusion.diffusion import LoadedModel, generate, load_checkpoint
from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior, paint_blobs
from napari_iscat_diffusion.evaluation.evaluate import HELD_OUT_SEED, simulated_set, simulation_parameters_for
from napari_iscat_diffusion.evaluation.peaks import measure_peaks

GENERATION_SEED = 7


def peak_table(
    images: np.ndarray, masks: np.ndarray, prior: ContrastPrior | None
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each image's blob numbering, and every particle's class and signed peak (physical units), over images,
    measured as the prior's were (the default measurement without one)."""
    settings = () if prior is None else (prior.reach_px, prior.background_radius_px)
    blobs, classes, peaks = [], [], []
    for image, mask in zip(images, masks, strict=True):
        numbered, image_classes, image_peaks = measure_peaks(image, mask.astype(np.int64), *settings)
        blobs.append(numbered)
        classes.append(image_classes)
        peaks.append(image_peaks)
    return blobs, np.concatenate(classes), np.concatenate(peaks)


def agreement(classes: np.ndarray, physics: np.ndarray, generated: np.ndarray) -> dict[str, dict[str, float]]:
    """Per class: Pearson correlation, least-squares slope (generated over physics), median relative deviation and
    sign agreement of generated peaks (particles whose physics peak is 0 left out)."""
    out = {}
    for label in np.unique(classes):
        chosen = (classes == label) & (physics != 0)
        reference, drawn = physics[chosen], generated[chosen]
        out[str(int(label))] = {
            "particles": int(chosen.sum()),
            "correlation": float(np.corrcoef(reference, drawn)[0, 1]),
            "slope": float(np.polyfit(reference, drawn, 1)[0]),
            "median_relative_deviation": float(np.median(np.abs(drawn - reference) / np.abs(reference))),
            "same_sign": float(np.mean(np.sign(drawn) == np.sign(reference))),
        }
    return out


def run(model: LoadedModel, n: int, size: int, batch: int) -> dict[str, dict]:
    """The agreement of given and of drawn contrasts (only drawn for a model without the channel)."""
    reference = simulated_set(simulation_parameters_for(model, size), n, HELD_OUT_SEED)
    prior = model.config.particle_contrast
    blobs, classes, physics = peak_table(reference.images, reference.masks, prior)
    masks = reference.masks.astype(np.int64)
    given, start = [], 0
    for numbered in blobs:
        count = int(numbered.max(initial=0))
        given.append(paint_blobs(numbered, physics[start : start + count]))
        start += count
    seeds = [GENERATION_SEED + i for i in range(n)]
    ways = {"drawn": None}
    if prior is not None:
        ways["given"] = np.stack(given)
    results = {}
    for way, contrasts in ways.items():
        images = generate(
            masks,
            model,
            seed=seeds,
            guidance=1.0,
            class_guidance={},
            batch_size=batch,
            device="cpu",
            particle_contrast=contrasts,
        )
        _, _, generated = peak_table(images, masks, prior)
        results[way] = agreement(classes, physics, generated)
        for label, row in results[way].items():
            deviation, sign, count = row["median_relative_deviation"], row["same_sign"], row["particles"]
            print(
                f"  {way:5s} class {label}: r {row['correlation']:.3f}, slope {row['slope']:.3f}, "
                f"median |dev| / |physics| {deviation:.3f}, "
                f"same sign {sign:.3f} ({count} particles)"
            )
    return results


def main() -> None:
    """Measure every checkpoint on the same masks and seeds; print and save the agreement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, help="safetensors files [bundled model]")
    parser.add_argument("--n", type=int, default=64, help="held-out masks [64]")
    parser.add_argument("--size", type=int, default=128, help="image side in px [128]")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass [8]")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = args.checkpoints or [bundled_model_path()]
    torch.set_grad_enabled(False)
    results = {}
    for path in paths:
        print(path)
        results[str(path)] = run(load_checkpoint(path), args.n, args.size, args.batch)
    write_results(
        "contrast_fidelity",
        machine_info(torch.device("cpu")),
        {"n": args.n, "size_px": args.size, "generation_seed": GENERATION_SEED, "agreement": results},
        args.out,
    )


if __name__ == "__main__":
    main()
