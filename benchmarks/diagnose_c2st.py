"""What the classifier two-sample test sees: C2ST accuracy on filtered and masked views of the same images.

Generates the evaluation's held-out masks (``evaluate_model``'s seeds, so the images are those of
``iscat-diffusion evaluate --n N``) with a checkpoint's defaults or ``--sampler``/``--steps``, then runs
the classifier two-sample test against the simulator's images on views that keep one kind of
information each: the images as they are; the fine texture (the image minus its Gaussian blur of
``--sigma`` px); the coarse structure (the blur); the background only (pixels within ``--radius`` PSF
radii of a mask blob set to 0 in both sets); the particles only (everything else set to 0); the
background's fine texture; each image over its own standard deviation (what is left without the images'
noise levels); the images transposed (rows and columns swapped in the generated and the second simulator
set only: the simulator's column noise has a direction). A view the classifier still wins on holds the
difference. Also runs the test between two simulator sets (the chance level), and on the generated images
with the simulator's column gains added (``column_noise``: what the test gives if only the camera's
column pattern were missing). Writes ``benchmarks/results/c2st_diagnosis.json`` with the machine's
description. ``--save-images`` keeps the generated images (.npy) and ``--images`` reads them back instead
of generating (same ``--n`` and ``--size``; the description says which file). ``--classifier-seeds K``
repeats each test with K classifier seeds (split, initialisation, batches) and reports their mean and
range: the test's own variance; ``--views`` limits the run to the views whose names start with the
given prefixes.

    python benchmarks/diagnose_c2st.py --n 288            # bundled model, 128x128
    python benchmarks/diagnose_c2st.py --sampler dpmpp_2m --steps 20 --out OUT.json
    python benchmarks/diagnose_c2st.py --class-guidance 1=1,2=2,3=2 --guidance 1 --out OUT.json
    python benchmarks/diagnose_c2st.py --n 864 --save-images runs/generated_864.npy --out OUT.json
    python benchmarks/diagnose_c2st.py --n 864 --images runs/generated_864.npy --views "as is" --classifier-seeds 5
    python benchmarks/diagnose_c2st.py --quick            # tiny untrained network, 8 masks of 32 px
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from common import benchmark_model, machine_info, write_results
from napari_iscat_diffusion.diffusion import resolve_device
from napari_iscat_diffusion.diffusion.guidance import parse_class_guidance
from napari_iscat_diffusion.evaluation.c2st import repeated_two_sample_test
from napari_iscat_diffusion.evaluation.evaluate import (
    FLOOR_SEED,
    detector_settings,
    generated_images,
    simulated_set,
    simulation_parameters_for,
)

TRANSPOSED = "transposed"
COLUMN_GAINS = "with the simulator's column gains added"


def views(images: np.ndarray, masks: np.ndarray, sigma_px: float, radius_px: float) -> dict[str, np.ndarray]:
    """The views of images (N, H, W) that the test compares: as they are, fine texture, coarse structure,
    background only and particles only (``radius_px`` around the mask's blobs), the background's fine
    texture, and each image over its own std."""
    blurred = np.stack([ndimage.gaussian_filter(image, sigma_px) for image in images])
    near = np.stack([ndimage.distance_transform_edt(mask == 0) <= radius_px for mask in masks])
    centred = images - images.mean(axis=(1, 2), keepdims=True)
    return {
        "as is": images,
        f"fine texture (minus blur of {sigma_px:g} px)": images - blurred,
        f"coarse structure (blur of {sigma_px:g} px)": blurred,
        f"background only (> {radius_px:.1f} px from blobs)": np.where(near, 0.0, images).astype(np.float32),
        f"particles only (<= {radius_px:.1f} px from blobs)": np.where(near, images, 0.0).astype(np.float32),
        "background fine texture": np.where(near, 0.0, images - blurred).astype(np.float32),
        "each image over its own std": (centred / centred.std(axis=(1, 2), keepdims=True)).astype(np.float32),
    }


def with_column_gains(images: np.ndarray, column_noise: float, seed: int = 0) -> np.ndarray:
    """Contrast images (N, H, W) as a camera with column gains ``1 + column_noise * N(0, 1)`` would record
    them (the simulator's fixed-pattern noise): ``(1 + image) * gain - 1`` per column."""
    gains = 1 + column_noise * np.random.default_rng(seed).standard_normal((images.shape[0], 1, images.shape[2]))
    return ((1 + images.astype(np.float64)) * gains - 1).astype(np.float32)


def main() -> None:
    """Generate, run the test on each view, print and save the accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny untrained network, 8 masks of 32 px")
    parser.add_argument("--n", type=int, default=288, help="held-out masks [288]")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels [128]")
    parser.add_argument("--sigma", type=float, default=1.5, help="blur that splits fine from coarse, px [1.5]")
    parser.add_argument("--radius", type=float, default=2.0, help="particle surroundings, PSF radii [2]")
    parser.add_argument("--sampler", default=None, help="sampler [the model's]")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps [the model's for the sampler]")
    parser.add_argument(
        "--guidance", type=float, default=None, help="guidance outside the classes' particles [the model's]"
    )
    parser.add_argument(
        "--class-guidance", type=parse_class_guidance, default=None, help="per-class scales, e.g. 1=1,2=2 [the model's]"
    )
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save-images", type=Path, default=None, help="write the generated images here (.npy)")
    parser.add_argument("--images", type=Path, default=None, help="generated images (.npy) to test instead")
    parser.add_argument("--classifier-seeds", type=int, default=1, help="classifier seeds per test [1]")
    parser.add_argument(
        "--views", type=lambda text: text.split(","), default=None, help="comma-separated view name prefixes [all]"
    )
    args = parser.parse_args()
    if args.classifier_seeds < 1:
        parser.error("--classifier-seeds must be at least 1")
    n, size = (8, 32) if args.quick else (args.n, args.size)
    device = resolve_device(args.device)
    model, description = benchmark_model(args.quick, args.model)
    params = simulation_parameters_for(model, size)
    reference = simulated_set(params, n)
    other = simulated_set(params, n, FLOOR_SEED)
    radius_px = args.radius * detector_settings(params).psf_radius_px
    # Check --views before generating, which can take many minutes.
    available = [*views(reference.images[:1], reference.masks[:1], args.sigma, radius_px), TRANSPOSED, COLUMN_GAINS]
    names = [name for name in available if args.views is None or name.startswith(tuple(args.views))]
    if not names:
        parser.error(f"--views {','.join(args.views)}: no view starts with these; views: {', '.join(available)}")
    sampler, steps = model.sampler_and_steps(args.sampler, 2 if args.quick else args.steps)
    options = {"sampler": sampler, "steps": steps, "device": device, "batch_size": 4}
    if args.class_guidance is not None:
        options["class_guidance"] = args.class_guidance
    if args.guidance is not None:
        options["guidance"] = args.guidance
    if args.images is not None:
        generated = np.load(args.images)
        if generated.shape != reference.images.shape:
            parser.error(f"--images {args.images}: shape {generated.shape}, expected {reference.images.shape}")
        description = f"{description}, images of {args.images}"
    else:
        generated = generated_images(model, reference.masks, list(range(n)), options, "generate", None)
    if args.save_images is not None:
        args.save_images.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.save_images, generated)
    model_views = views(generated, reference.masks, args.sigma, radius_px)
    reference_views = views(reference.images, reference.masks, args.sigma, radius_px)
    other_views = views(other.images, other.masks, args.sigma, radius_px)
    for named_views in (model_views, other_views):
        named_views[TRANSPOSED] = np.swapaxes(named_views["as is"], 1, 2).copy()
    reference_views[TRANSPOSED] = reference_views["as is"]
    model_views[COLUMN_GAINS] = with_column_gains(generated, params.column_noise)
    other_views[COLUMN_GAINS] = other_views["as is"]
    reference_views[COLUMN_GAINS] = reference_views["as is"]
    seeds = list(range(args.classifier_seeds))
    results = {"model": description, "n": n, "size": size, "sampler": sampler, "steps": steps, "seeds": seeds}
    if args.class_guidance is not None:
        results["class_guidance"] = args.class_guidance
    if args.guidance is not None:
        results["guidance"] = args.guidance
    results["views"] = {}
    print(f"{description}, {n} masks of {size} px, {steps} {sampler} steps: C2ST accuracy (95 % interval)")
    for name in names:
        against_model = repeated_two_sample_test(model_views[name], reference_views[name], repeats=len(seeds))
        chance = repeated_two_sample_test(other_views[name], reference_views[name], repeats=len(seeds))
        model_spread, chance_spread = against_model.pop("over_seeds", None), chance.pop("over_seeds", None)
        results["views"][name] = {"model": against_model, "two_simulator_sets": chance}
        line = (
            f"  {name}: model {against_model['accuracy']:.3f} ({against_model['ci_low']:.2f}-"
            f"{against_model['ci_high']:.2f}), two simulator sets {chance['accuracy']:.3f}"
        )
        if model_spread is not None:
            results["views"][name]["over_seeds"] = {"model": model_spread, "two_simulator_sets": chance_spread}
            line += (
                f"; over {len(seeds)} classifier seeds: model {model_spread['mean']:.3f} "
                f"({model_spread['min']:.2f}-{model_spread['max']:.2f}), two simulator sets "
                f"{chance_spread['mean']:.3f} ({chance_spread['min']:.2f}-{chance_spread['max']:.2f})"
            )
        print(line)
    write_results("c2st_diagnosis", machine_info(device), results, args.out)


if __name__ == "__main__":
    main()
