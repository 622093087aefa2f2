"""How much a sampler widens or narrows Gaussian data on a checkpoint's sigma grid.

For Gaussian data of variance P the exact denoiser is ``D(x, sigma) = P / (P + sigma^2) x`` and the
probability-flow ODE keeps every marginal exact, so a sampler that starts from the exact marginal at
the grid's first sigma should end with variance P. What it ends with instead is its discretisation error
on the part of an image that is close to Gaussian: an iSCAT background (shot noise and speckle) is, each
spatial frequency with its own P. The deterministic samplers are linear in x for a linear denoiser, so
their output's variance is computed exactly (``grid_fit.gaussian_variance_ratios``, no random numbers); the
stochastic samplers' (DDPM, the SDE) is a seeded Monte Carlo estimate (``--sde-samples`` draws per density,
with the checkpoint's ``noise_sigma_min`` for the SDE). Each sampler runs on its plain grid (log-SNR from
the checkpoint's start; DDPM and DDIM on the training schedule's timesteps), DPM-Solver++ 2M and its SDE
also on the grid fitted to the density range for DPM-Solver++ 2M (``grid_fit.fitted_sigmas``).

P is in the model's normalised units; the range is the checkpoint's ``sampling_density_range`` unless
``--density-range`` gives one (the bundled model's, 0.3-1500, runs from below the white shot-noise floor,
about 0.45, to the strongest single frequency of its training images). Prints the smallest and largest
variance ratio over that range for each sampler, grid and step count, and writes
``benchmarks/results/sampler_gaussian_bias.json`` with the machine's description.

    python benchmarks/sampler_gaussian_bias.py
    python benchmarks/sampler_gaussian_bias.py --samplers dpmpp_2m --steps 10 20 40 80 --model runs/x.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import benchmark_model, machine_info, write_results
from napari_iscat_diffusion.diffusion import SAMPLERS, get_sampler
from napari_iscat_diffusion.diffusion.grid_fit import (
    FITTED_SAMPLERS,
    NUM_DENSITIES,
    fitted_sigmas,
    gaussian_variance_ratios,
)
from napari_iscat_diffusion.diffusion.samplers import sampling_sigmas

# The fitted grid is DPM-Solver++ 2M's; its SDE form is measured on it too.
ON_FITTED_GRID = (*FITTED_SAMPLERS, "dpmpp_2m_sde")


def main() -> None:
    """Print and save the variance ratios for each sampler and step count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a .safetensors checkpoint [bundled]")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument(
        "--sde-samples", type=int, default=200_000, help="Monte Carlo draws per density for DDPM and the SDE [200000]"
    )
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 15, 20, 40, 80])
    parser.add_argument(
        "--density-range",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="spectral densities, normalised units^2 [the checkpoint's sampling_density_range]",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if min(args.steps) < 1:
        parser.error("--steps must be at least 1")
    if args.sde_samples < 2:
        parser.error("--sde-samples must be at least 2")
    model, description = benchmark_model(False, args.model)
    if args.density_range is None and model.config.sampling_density_range is None:
        parser.error(f"{description} has no sampling_density_range: give --density-range LOW HIGH")
    low, high = args.density_range or model.config.sampling_density_range
    if not 0 < low < high:
        parser.error(f"--density-range needs 0 < LOW < HIGH, got {low} {high}")
    densities = np.geomspace(low, high, NUM_DENSITIES)
    results = {"model": description, "densities": densities.tolist(), "samplers": {}}
    print(f"{description}: output variance / data variance for Gaussian data of variance {low:g}-{high:g}")
    sigma_min, sigma_max = model.schedule.sigma_min, model.sampling_sigma_max
    for sampler in args.samplers:
        rows = []
        for steps in args.steps:
            grids = {"plain": sampling_sigmas(sampler, steps, sigma_min, sigma_max, schedule=model.schedule)}
            if sampler in ON_FITTED_GRID:
                grids["fitted"] = fitted_sigmas(steps, sigma_min, sigma_max, (low, high))
            evaluations = steps * get_sampler(sampler).evals_per_step
            monte_carlo = {"samples": args.sde_samples, "options": model.sampler_options(sampler)}
            for grid, sigmas in grids.items():
                extra = monte_carlo if get_sampler(sampler).stochastic else {}
                ratios = gaussian_variance_ratios(sampler, sigmas, densities, **extra)
                rows.append(
                    {
                        "steps": steps,
                        "grid": grid,
                        "monte_carlo_samples": extra.get("samples"),
                        "network_evaluations": evaluations,
                        "sigmas": sigmas.tolist(),
                        "min": float(ratios.min()),
                        "max": float(ratios.max()),
                        "ratios": ratios.tolist(),
                    }
                )
                print(
                    f"  {sampler:12s} {steps:3d} steps ({evaluations:3d} evaluations), {grid} grid from sigma "
                    f"{float(sigmas[0]):g}: {ratios.min():.3f}-{ratios.max():.3f}"
                )
        results["samplers"][sampler] = rows
    write_results("sampler_gaussian_bias", machine_info(), results, args.out)


if __name__ == "__main__":
    main()
