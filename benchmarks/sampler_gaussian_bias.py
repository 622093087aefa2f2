"""How much a deterministic sampler widens or narrows Gaussian data on a checkpoint's sigma grid.

For Gaussian data of variance P the exact denoiser is ``D(x, sigma) = P / (P + sigma^2) x`` and the
probability-flow ODE keeps every marginal exact, so a sampler that starts from the exact marginal at
the grid's first sigma should end with variance P. What it ends with instead is its discretisation error
on the part of an image that is close to Gaussian: an iSCAT background (shot noise and speckle) is, each
spatial frequency with its own P. The samplers here are linear in x for a linear denoiser, so the
output's variance is computed exactly (no random numbers): ``variance ratio = output^2 / P`` for a unit
start scaled to the exact marginal.

P is in the model's normalised units. For the bundled model's training data the spectral density runs
from about 0.45 (the white shot-noise floor above 0.2 cycles/px) to about 100 (particles and speckle at
low frequencies), so the default range 0.3-1500 covers it with room. Prints the smallest and largest
variance ratio over that range for each sampler and step count, and writes
``benchmarks/results/sampler_gaussian_bias.json`` with the machine's description.

    python benchmarks/sampler_gaussian_bias.py
    python benchmarks/sampler_gaussian_bias.py --samplers dpmpp_2m --steps 10 20 40 80 --model runs/x.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common import benchmark_model, machine_info, write_results
from napari_iscat_diffusion.diffusion import get_sampler

# Samplers that add no noise of their own: their output is a fixed linear function of the start.
DETERMINISTIC = ("ddim", "dpmpp_2m", "euler", "heun")


def variance_ratios(sampler: str, sigmas: torch.Tensor, densities: np.ndarray) -> np.ndarray:
    """Output variance over P for Gaussian data of each variance in ``densities`` (P, model units^2), sampled
    by ``sampler`` on the grid ``sigmas`` (descending, ending at 0) with the exact denoiser. 1 = exact."""
    if sampler not in DETERMINISTIC:
        raise ValueError(f"{sampler!r} adds noise of its own; choose from {', '.join(DETERMINISTIC)}")
    variance = torch.as_tensor(densities, dtype=torch.float64).reshape(-1, 1, 1, 1)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return variance / (variance + sigma.reshape(-1, 1, 1, 1) ** 2) * x

    start = (variance + float(sigmas[0]) ** 2).sqrt()
    out = get_sampler(sampler).function(denoise, start, sigmas.to(torch.float64))
    return (out**2 / variance).reshape(-1).numpy()


def main() -> None:
    """Print and save the variance ratios for each sampler and step count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled]")
    parser.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "euler", "heun"], choices=DETERMINISTIC)
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 15, 20, 40, 80])
    parser.add_argument("--density-range", nargs=2, type=float, default=[0.3, 1500.0], metavar=("LOW", "HIGH"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    low, high = args.density_range
    if not 0 < low < high:
        parser.error(f"--density-range needs 0 < LOW < HIGH, got {low} {high}")
    if min(args.steps) < 1:
        parser.error("--steps must be at least 1")
    model, description = benchmark_model(False, args.model)
    densities = np.geomspace(low, high, 41)
    results = {"model": description, "densities": densities.tolist(), "samplers": {}}
    print(f"{description}: output variance / data variance for Gaussian data of variance {low:g}-{high:g}")
    for sampler in args.samplers:
        rows = []
        for steps in args.steps:
            sigmas = model.sampling_sigmas(sampler, steps)
            ratios = variance_ratios(sampler, sigmas, densities)
            evaluations = steps * get_sampler(sampler).evals_per_step
            rows.append(
                {
                    "steps": steps,
                    "network_evaluations": evaluations,
                    "sigma_start": float(sigmas[0]),
                    "sigma_last_nonzero": float(sigmas[-2]),
                    "min": float(ratios.min()),
                    "max": float(ratios.max()),
                    "ratios": ratios.tolist(),
                }
            )
            print(
                f"  {sampler:9s} {steps:3d} steps ({evaluations:3d} evaluations, sigma {float(sigmas[0]):g} to "
                f"{float(sigmas[-2]):.3g}, then 0): {ratios.min():.3f}-{ratios.max():.3f}"
            )
        results["samplers"][sampler] = rows
    write_results("sampler_gaussian_bias", machine_info(), results, args.out)


if __name__ == "__main__":
    main()
