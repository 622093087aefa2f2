"""How well checkpoints denoise held-out simulator images, noise level by noise level.

Each held-out image (the evaluation's, seeds from 3e9) is noised to a level sigma (in the normalised units of
the first checkpoint: the background's noise is about 1, a bead's peak 10-60) with the same noise for every
checkpoint, and each checkpoint's denoiser (with its mask, no guidance) predicts the clean image. Checkpoints
whose normalisations differ (a fine-tune recomputes it from its data) see the same physical noise, sigma in their
own units scaled accordingly. Prints, per checkpoint and sigma, the mean squared error of that prediction (the
first checkpoint's normalised units squared) over the pixels within 4 px of a particle of each class, over the
rest (background), and over each class's surroundings (4-16 px from its particles and more than 4 px from any:
where a bead's rings lie; these pixels are also background), and the ratio of each checkpoint's error to the
first one's. At a given sigma the best possible error is the data's own uncertainty, so the ratios compare
checkpoints; the training loss weighs these errors by the min-SNR weight (``train.min_snr_gamma``,
``train.min_snr_floor``). Writes ``benchmarks/results/denoising_error_by_sigma.json`` with the machine's
description.

    python benchmarks/denoising_error_by_sigma.py                       # bundled model only
    python benchmarks/denoising_error_by_sigma.py --checkpoints runs/a.safetensors runs/b.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import bundled_model_path, machine_info, write_results
from napari_iscat_diffusion.diffusion import LoadedModel, load_checkpoint
from napari_iscat_diffusion.diffusion.conditioning import encode_condition
from napari_iscat_diffusion.evaluation.evaluate import HELD_OUT_SEED, simulated_set, simulation_parameters_for
from napari_iscat_diffusion.evaluation.peaks import peak_map

SIGMAS = (0.3, 1.0, 3.0, 10.0, 30.0, 80.0, 300.0, 2000.0)
NEIGHBOURHOOD_PX = 4
SURROUNDINGS_PX = 16


def pixel_groups(masks: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Boolean maps (N, 1, H, W) of the pixels within ``NEIGHBOURHOOD_PX`` (px, square) of each class's mask
    pixels (``"class k"``), of the pixels near none (``"background"``) and, of those, the ones within
    ``SURROUNDINGS_PX`` of class k (``"around k"``), from label masks (N, H, W)."""

    def near(k: int, radius: int) -> torch.Tensor:
        labelled = (masks == k).float().unsqueeze(1)
        return torch.nn.functional.max_pool2d(labelled, 2 * radius + 1, stride=1, padding=radius) > 0

    groups = {f"class {k}": near(k, NEIGHBOURHOOD_PX) for k in range(1, num_classes + 1)}
    background = ~torch.stack(list(groups.values())).any(dim=0)
    groups["background"] = background
    for k in range(1, num_classes + 1):
        groups[f"around {k}"] = background & near(k, SURROUNDINGS_PX)
    return groups


@torch.no_grad()
def errors_by_sigma(
    model: LoadedModel, images: np.ndarray, masks: np.ndarray, sigmas: tuple[float, ...], batch: int, unit: float
) -> dict:
    """``{sigma: {group: mean squared error}}`` of ``model`` on physical images (N, H, W) with label masks
    (N, H, W), sigma and errors in units of ``unit`` (the physical size of one normalised unit of the first
    checkpoint); the noise for image i at the j-th sigma comes from seed ``1000 * j + i``."""
    mean, std = model.config.normalization["mean"][0], model.config.normalization["std"][0]
    to_unit = std / unit
    denoise = model.denoiser()
    x0 = torch.from_numpy((images - mean) / std).float().unsqueeze(1)
    labels = torch.from_numpy(masks.astype(np.int64))
    groups = pixel_groups(labels, model.config.num_classes)
    prior = model.config.particle_contrast  # a contrast channel is told each particle's peak in the clean image
    out = {}
    for j, sigma in enumerate(sigmas):
        own_sigma = sigma / to_unit
        squared = torch.empty_like(x0)
        for start in range(0, len(x0), batch):
            part = slice(start, start + batch)
            noise = torch.stack(
                [
                    torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(1000 * j + i))
                    for i in range(len(x0))[part]
                ]
            )
            contrast = None
            if prior is not None:
                pairs = zip(x0[part], labels[part], strict=True)
                maps = [peak_map(image[0].numpy(), mask.numpy(), prior) for image, mask in pairs]
                contrast = torch.from_numpy(np.stack(maps) / prior.scale)
            cond = encode_condition(labels[part], model.config.num_classes, contrast=contrast)
            prediction = denoise(x0[part] + own_sigma * noise, torch.full((len(noise),), own_sigma), cond)
            squared[part] = ((prediction - x0[part]) * to_unit) ** 2
        out[sigma] = {name: float(squared[where].mean()) if where.any() else None for name, where in groups.items()}
    return out


def main() -> None:
    """Measure every checkpoint on the same images and noise, print and save the errors and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, help="safetensors files [bundled model]")
    parser.add_argument("--n", type=int, default=32, help="held-out images [32]")
    parser.add_argument("--size", type=int, default=128, help="image side in px [128]")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    paths = args.checkpoints or [bundled_model_path()]
    torch.set_grad_enabled(False)
    models = {str(p): load_checkpoint(p) for p in paths}
    first_model = models[str(paths[0])]
    reference = simulated_set(simulation_parameters_for(first_model, args.size), args.n, HELD_OUT_SEED)
    unit = first_model.config.normalization["std"][0]
    sigmas = tuple(args.sigmas)
    results = {
        path: errors_by_sigma(model, reference.images, reference.masks, sigmas, args.batch, unit)
        for path, model in models.items()
    }
    first = results[str(paths[0])]
    for path, errors in results.items():
        print(path)
        for sigma in sigmas:
            cells = []
            for name, value in errors[sigma].items():
                if value is None:
                    cells.append(f"{name} -")
                    continue
                base = first[sigma][name]
                ratio = f" ({value / base:.3f}x)" if base and errors is not first else ""
                cells.append(f"{name} {value:.4g}{ratio}")
            print(f"  sigma {sigma:7g}: " + ", ".join(cells))
    write_results(
        "denoising_error_by_sigma",
        machine_info(torch.device("cpu")),
        {
            "n": args.n,
            "size_px": args.size,
            "neighbourhood_px": NEIGHBOURHOOD_PX,
            "surroundings_px": SURROUNDINGS_PX,
            "mse": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
