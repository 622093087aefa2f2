"""Samplers: DDPM, DDIM, DPM-Solver++ (2M, ODE and SDE), Euler and Heun as small functions over a denoiser.

Every sampler has the signature ``sample_name(denoise, x, sigmas, *, generators=None,
callback=None, **options) -> x0`` (the design of k-diffusion's ``sampling.py``):

- ``denoise(x, sigma) -> x0_hat`` takes the images (N, C, H, W) in sigma space and their noise
  levels as an (N,) tensor in the dtype of ``x``;
- ``x`` is the initial noise, already scaled to ``sigmas[0]``;
- ``sigmas`` is a 1-D strictly descending tensor, usually ending at 0. The sampler finishes on
  ``sigmas[-1]``; when that is 0 the result is the last prediction of the clean image, with no
  residual noise;
- fresh noise (ancestral samplers) is drawn per image from ``generators[i]``, so that an image
  depends on its own generator only, never on the batch it is in;
- ``callback(step, x, denoised)`` is called after each step; returning True raises
  ``SamplingCancelled``.

The images stay in the dtype of ``x``; the step coefficients are computed from ``sigmas`` as
Python (float64) numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import torch

from .denoiser import Denoiser
from .schedules import DiscreteSchedule, Spacing, discrete_sigmas, karras_sigmas, log_snr_sigmas

Callback = Callable[[int, torch.Tensor, torch.Tensor], bool | None]
Sampler = Callable[..., torch.Tensor]
GridKind = Literal["discrete", "karras", "logsnr"]
GRIDS: tuple[str, ...] = ("discrete", "karras", "logsnr")


class SamplingCancelled(Exception):
    """Raised by a sampler when its callback returned True, or by ``generate`` when its ``should_stop`` did.

    ``step`` is the last step finished (0-based); -1 when sampling stopped inside the first step.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"sampling cancelled after step {step}" if step >= 0 else "sampling cancelled in step 0")
        self.step = step


def randn_per_image(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` (N, ...), on x's device and in x's dtype.

    Image ``i`` is drawn (in float32, on the generator's device) from ``generators[i]`` only, so
    the same seed gives the same noise whatever the batch. With ``generators=None`` the global
    random number generator of x's device is used.
    """
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {x.shape[0]} images")
    noise = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack([n.to(x.device) for n in noise]).to(x.dtype)


def _sigma_list(sigmas: torch.Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got shape {tuple(sigmas.shape)}")
    values = [float(s) for s in sigmas.to(torch.float64).tolist()]
    if values[-1] < 0 or any(b >= a for a, b in pairwise(values)):
        raise ValueError("sigmas must be non-negative and strictly descending")
    return values


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


def _report(callback: Callback | None, step: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None and callback(step, x, denoised):
        raise SamplingCancelled(step)


def _first_order_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Exact solution of the PF-ODE from sigma to sigma_next with the prediction held constant (= Euler in sigma)."""
    if sigma_next == 0:
        return denoised
    return denoised + (sigma_next / sigma) * (x - denoised)


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` (Karras et al. 2022).

    Deterministic (``generators`` is accepted for a uniform signature and unused); identical to
    DDIM with eta = 0. Returns the sample at ``sigmas[-1]``.
    """
    values = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(pairwise(values)):
        denoised = denoise(x, _sigma_batch(x, sigma))
        x = _first_order_step(x, denoised, sigma, sigma_next)
        _report(callback, i, x, denoised)
    return x


def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1 without churn).

    Two denoiser calls per step, except for a step to sigma = 0, which is an Euler step.
    Deterministic (``generators`` is unused). Returns the sample at ``sigmas[-1]``.
    """
    values = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(pairwise(values)):
        denoised = denoise(x, _sigma_batch(x, sigma))
        x_euler = _first_order_step(x, denoised, sigma, sigma_next)
        if sigma_next == 0:
            x = x_euler
        else:
            slope = (x - denoised) / sigma
            slope_next = (x_euler - denoise(x_euler, _sigma_batch(x, sigma_next))) / sigma_next
            x = x + (slope + slope_next) * ((sigma_next - sigma) / 2)
        _report(callback, i, x, denoised)
    return x


def ddim_noise_levels(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a DDIM step from sigma to sigma_next into ``(sigma_down, sigma_up)``.

    ``sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))`` is
    the standard deviation of the fresh noise and ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``
    the noise level kept from ``x``.
    """
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in sigma space; ``eta = 0`` is deterministic, ``eta = 1`` is DDPM.

    The VP update ``x_t' = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps + s_t z`` with
    ``s_t^2 = eta^2 (1 - a') / (1 - a) (1 - a / a')`` (``a`` = alpha_bar), divided by ``sqrt(a')``
    and written with ``sigma^2 = (1 - a) / a``, becomes
    ``x' = x0 + sigma_down * eps + sigma_up * z`` with ``eps = (x - x0) / sigma``,
    ``sigma_up^2 = s_t^2 / a' = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2`` and
    ``sigma_down^2 = sigma'^2 - sigma_up^2`` (see ``ddim_noise_levels``). Fresh noise ``z`` comes
    from ``generators`` (one per image). Returns the sample at ``sigmas[-1]``.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    values = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(pairwise(values)):
        denoised = denoise(x, _sigma_batch(x, sigma))
        sigma_down, sigma_up = ddim_noise_levels(sigma, sigma_next, eta)
        x = _first_order_step(x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            x = x + sigma_up * randn_per_image(x, generators)
        _report(callback, i, x, denoised)
    return x


def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral DDPM sampling (Ho et al. 2020): DDIM with eta = 1, i.e. the DDPM posterior variance.

    On the grid of all T training timesteps this is the original DDPM sampler; on a strided grid
    it samples the strided DDPM posterior. Returns the sample at ``sigmas[-1]``.
    """
    return sample_ddim(denoise, x, sigmas, generators=generators, callback=callback, eta=1.0)


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    breaks: Sequence[float] = (),
    eta: float = 0.0,
    noise_sigma_min: float = 0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in ``t = -log(sigma)``, as in k-diffusion.

    The first step is first order; later steps extrapolate the prediction linearly from the last
    two. A step to sigma = 0 returns the prediction. ``breaks`` are noise levels at which the denoiser
    jumps (the ends of a guidance interval): the first evaluation at or below a break is not extrapolated
    from the one above it, since the extrapolation would treat the jump as a trend and overshoot it by half;
    that step is first order.

    ``eta = 0`` solves the probability-flow ODE and is deterministic (``generators`` is unused). ``eta > 0``
    is the SDE variant (k-diffusion's ``sample_dpmpp_2m_sde``, midpoint form): each step goes to
    ``sigma_down = sigma' (sigma' / sigma)^eta`` and adds fresh noise of ``sigma_up = sqrt(sigma'^2 -
    sigma_down^2)`` from ``generators`` (one per image); with ``eta = 1`` that is the reverse SDE, whose
    noise corrects errors of earlier steps. Steps that end at or below ``noise_sigma_min`` follow the ODE
    (Karras et al. 2022's S_tmin): there the image's finest texture forms, and noise added by a coarse grid's
    last steps is not removed again. Returns the sample at ``sigmas[-1]``.
    """
    if not eta >= 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    values = _sigma_list(sigmas)
    previous: torch.Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(pairwise(values)):
        denoised = denoise(x, _sigma_batch(x, sigma))
        crossed = i > 0 and any(sigma <= level < values[i - 1] for level in breaks)
        target = denoised
        if previous is not None and sigma_next > 0 and not crossed:
            half_inv_r = math.log(sigma / sigma_next) / (2 * math.log(values[i - 1] / sigma))
            target = (1 + half_inv_r) * denoised - half_inv_r * previous
        sigma_down = sigma_next * (sigma_next / sigma) ** (eta if sigma_next > noise_sigma_min else 0.0)
        x = _first_order_step(x, target, sigma, sigma_down)
        if sigma_down < sigma_next:
            x = x + math.sqrt(sigma_next**2 - sigma_down**2) * randn_per_image(x, generators)
        previous = denoised
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generators: Sequence[torch.Generator] | None = None,
    callback: Callback | None = None,
    breaks: Sequence[float] = (),
    noise_sigma_min: float = 0.0,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE: ``sample_dpmpp_2m`` with ``eta = 1``, fresh noise from ``generators`` on every
    step that ends above ``noise_sigma_min``. Returns the sample at ``sigmas[-1]``."""
    return sample_dpmpp_2m(
        denoise, x, sigmas, generators=generators, callback=callback, breaks=breaks, eta=1.0,
        noise_sigma_min=noise_sigma_min,
    )  # fmt: skip


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and its defaults.

    Attributes:
        name: registry key.
        label: human-readable name.
        function: the sampler function.
        default_steps: number of steps used when neither the caller nor the checkpoint gives one.
        grid: default sigma grid, ``"discrete"`` (spaced training timesteps), ``"logsnr"`` (uniform in log-SNR)
            or ``"karras"``.
        evals_per_step: denoiser calls per step.
        multistep: reuses predictions of earlier steps, so it takes ``breaks``, the noise levels at which the
            denoiser jumps (see ``sample_dpmpp_2m``).
        sde: adds fresh noise on its steps and takes ``noise_sigma_min``, the noise level at and below which
            it follows the ODE instead (see ``sample_dpmpp_2m``).
        stochastic: draws fresh noise from ``generators`` (DDPM and the SDE), so its output is random for a fixed start.
        description: one sentence for a user choosing a sampler (the widget's tooltip).
    """

    name: str
    label: str
    function: Sampler
    default_steps: int
    grid: GridKind
    evals_per_step: int
    multistep: bool = False
    sde: bool = False
    stochastic: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.sde and not self.stochastic:
            raise ValueError(f"{self.name}: an SDE sampler draws fresh noise, so it is stochastic")


# First-order samplers lose a Gaussian texture's variance on every grid (docs/diffusion-core.md, *First-order
# samplers*), so their descriptions say they need many steps.
_FIRST_ORDER = "first order: draws fine texture (the background's noise) too weak unless given hundreds of steps"
SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo(
            "ddpm",
            "DDPM",
            sample_ddpm,
            100,
            "discrete",
            1,
            stochastic=True,
            description=f"Ancestral sampling on the training timesteps, fresh noise every step; {_FIRST_ORDER}.",
        ),
        SamplerInfo(
            "ddim",
            "DDIM",
            sample_ddim,
            50,
            "discrete",
            1,
            description=f"Deterministic, on the training timesteps (Euler's step); {_FIRST_ORDER}.",
        ),
        SamplerInfo(
            "dpmpp_2m",
            "DPM-Solver++ 2M",
            sample_dpmpp_2m,
            20,
            "logsnr",
            1,
            multistep=True,
            description="Second order, one network pass per step; on a checkpoint's fitted grid it keeps Gaussian "
            "texture exact in 10-20 steps. The recommended sampler.",
        ),
        SamplerInfo(
            "dpmpp_2m_sde",
            "DPM-Solver++ 2M SDE",
            sample_dpmpp_2m_sde,
            20,
            "logsnr",
            1,
            multistep=True,
            sde=True,
            stochastic=True,
            description="DPM-Solver++ 2M with fresh noise on the steps above the finest noise levels; needs more "
            "steps than the ODE form (about 50 with the bundled model).",
        ),
        SamplerInfo(
            "euler",
            "Euler",
            sample_euler,
            40,
            "logsnr",
            1,
            description=f"Deterministic, one network pass per step; {_FIRST_ORDER}.",
        ),
        SamplerInfo(
            "heun",
            "Heun",
            sample_heun,
            20,
            "logsnr",
            2,
            description="Second order, two network passes per step; overshoots at few steps (needs about 50 with "
            "the bundled model).",
        ),
    )
}


# The sampler of a checkpoint that names none (``ModelConfig.default_sampler``).
DEFAULT_SAMPLER = "dpmpp_2m"


def get_sampler(name: str) -> SamplerInfo:
    """The registry entry of a sampler; raises ValueError listing the valid names for an unknown one."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None


def check_steps(steps: int, num_timesteps: int) -> int:
    """``steps`` if it is a step count from 1 to ``num_timesteps``, the model's training timesteps, for any sampler.

    The discrete samplers cannot take more (they step on the training timesteps) and the continuous grids gain
    nothing finer than the timesteps the network was trained on, while fitting or stepping through millions of
    levels would only hang. Raises ValueError saying the allowed range.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"steps must be a whole number from 1 to {num_timesteps} (the model's training timesteps), got {steps!r}"
        )
    return steps


def sampling_sigmas(
    sampler_name: str,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    schedule: DiscreteSchedule | None = None,
    grid: GridKind | None = None,
    spacing: Spacing = "trailing",
) -> torch.Tensor:
    """The sigma grid for ``num_steps`` steps of a sampler: descending, ending at 0, shape (num_steps + 1,), float64.

    ``grid`` (default: the sampler's) is ``"logsnr"`` (``log_snr_sigmas``) or ``"karras"``
    (``karras_sigmas``), both between sigma_min and sigma_max, or ``"discrete"`` (``discrete_sigmas``
    of ``schedule`` with the given timestep ``spacing``; the schedule's own range is used and
    sigma_min, sigma_max are ignored).
    """
    kind = get_sampler(sampler_name).grid if grid is None else grid
    if kind == "logsnr":
        return log_snr_sigmas(num_steps, sigma_min, sigma_max)
    if kind == "karras":
        return karras_sigmas(num_steps, sigma_min, sigma_max)
    if kind == "discrete":
        if schedule is None:
            raise ValueError("a discrete sigma grid needs the model's DiscreteSchedule")
        return discrete_sigmas(schedule, num_steps, spacing)
    raise ValueError(f"unknown sigma grid {kind!r}; expected one of {GRIDS}")
