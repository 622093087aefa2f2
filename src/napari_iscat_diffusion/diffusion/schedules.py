"""Noise schedules and noise-level grids.

Conventions (shared by every module of the diffusion core):

- A discrete-time (DDPM) model is trained on ``x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps``
  for integer timesteps ``t = 0 .. T-1``.
- Samplers work in "sigma space" (variance exploding, as in EDM and k-diffusion):
  ``x = x0 + sigma * eps`` with ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, so that
  ``x_t = x / sqrt(1 + sigma^2)``. The log signal-to-noise ratio is ``log_snr = -2 log(sigma)``.

Schedules are computed in float64 and converted where they are used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SCHEDULES: tuple[str, ...] = ("linear", "cosine")


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A discrete-time variance-preserving noise schedule.

    Attributes:
        name: ``"linear"`` or ``"cosine"``.
        betas: per-step noise variances, shape (T,), float64.
        params: the constructor's parameters other than T (for example beta_start, beta_end or s).
    """

    name: str
    betas: torch.Tensor
    params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        betas = self.betas
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie strictly between 0 and 1")

    @property
    def num_timesteps(self) -> int:
        """Number of discrete training timesteps T."""
        return int(self.betas.numel())

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t = prod_{s<=t} (1 - beta_s), shape (T,), float64, decreasing."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def sigmas(self) -> torch.Tensor:
        """Sigma-space noise level of each timestep, sqrt((1 - alpha_bar) / alpha_bar), shape (T,), increasing."""
        ab = self.alphas_cumprod
        return ((1.0 - ab) / ab).sqrt()

    @property
    def log_snr(self) -> torch.Tensor:
        """log(alpha_bar / (1 - alpha_bar)) of each timestep, shape (T,), decreasing."""
        ab = self.alphas_cumprod
        return torch.log(ab) - torch.log1p(-ab)

    @property
    def sigma_min(self) -> float:
        """Smallest sigma of the schedule (timestep 0)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest sigma of the schedule (timestep T-1)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Map sigma-space noise levels to continuous timesteps in [0, T-1].

        Interpolates linearly in log(sigma) between neighbouring discrete timesteps, so that the
        sigma of an integer timestep maps back exactly to that integer. Values outside the
        schedule's range are clamped to its ends. Returns a tensor of sigma's shape and dtype.
        """
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.to(torch.float64).clamp_min(1e-30).log()
        log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).reshape(log_sigma.shape)
        high = high.clamp(1, self.num_timesteps - 1)
        low = high - 1
        frac = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return (low + frac.clamp(0.0, 1.0)).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Map continuous timesteps in [0, T-1] to sigma (log-linear interpolation, inverse of sigma_to_t)."""
        log_sigmas = self.sigmas.log().to(t.device)
        t64 = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        low = t64.floor().long().clamp(max=self.num_timesteps - 2)
        frac = t64 - low
        return ((1 - frac) * log_sigmas[low] + frac * log_sigmas[low + 1]).exp().to(t.dtype)

    def to_config(self) -> dict:
        """JSON-serialisable description from which ``schedule_from_config`` rebuilds this schedule."""
        return {"name": self.name, "num_timesteps": self.num_timesteps, **self.params}


def linear_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """DDPM linear schedule (Ho et al. 2020): betas evenly spaced from beta_start to beta_end.

    The defaults are the DDPM values for T = 1000; for another T the end points are scaled by
    1000 / T as in improved DDPM, so that the total amount of noise stays the same.
    """
    scale = 1000.0 / num_timesteps
    betas = torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    return DiscreteSchedule("linear", betas, {"beta_start": beta_start, "beta_end": beta_end})


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Continuous cosine alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), t in [0, 1]."""
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return f / f0


def cosine_schedule(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> DiscreteSchedule:
    """Cosine schedule (Nichol and Dhariwal 2021): beta_t = 1 - abar((t+1)/T) / abar(t/T), clipped at max_beta."""
    grid = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    ab = cosine_alpha_bar(grid, s)
    betas = (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)
    return DiscreteSchedule("cosine", betas, {"s": s, "max_beta": max_beta})


def schedule_from_config(config: dict) -> DiscreteSchedule:
    """Build a schedule from ``{"name": "linear" | "cosine", "num_timesteps": T, **params}`` (see ``to_config``)."""
    params = dict(config)
    name = params.pop("name", None)
    builders = {"linear": linear_schedule, "cosine": cosine_schedule}
    if name not in builders:
        raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")
    try:
        return builders[name](**params)
    except TypeError as err:
        raise ValueError(f"bad parameters for the {name} noise schedule: {params}") from err


def timestep_spacing(num_train_timesteps: int, num_steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """Choose ``num_steps`` integer timesteps out of ``num_train_timesteps`` for few-step sampling.

    Follows the definitions of Lin et al. 2024 ("Common diffusion noise schedules and sample
    steps are flawed", table 2), which diffusers also uses:

    - ``leading``: ``arange(0, T, T // n)`` (never reaches T-1 unless n == T);
    - ``trailing``: ``round(arange(T, 0, -T / n)) - 1`` (always starts at T-1);
    - ``linspace``: ``round(linspace(0, T-1, n))``.

    Returns a descending int64 tensor of length ``num_steps``.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}")
    T, n = num_train_timesteps, num_steps
    if spacing == "leading":
        steps = torch.arange(n, dtype=torch.float64) * (T // n)
    elif spacing == "trailing":
        steps = torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)[:n]) - 1
    elif spacing == "linspace":
        steps = torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64))
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return steps.long().sort(descending=True).values


def discrete_sigmas(schedule: DiscreteSchedule, num_steps: int, spacing: Spacing = "trailing") -> torch.Tensor:
    """Sigma grid at spaced discrete timesteps, descending, with a final 0: shape (num_steps + 1,), float64."""
    steps = timestep_spacing(schedule.num_timesteps, num_steps, spacing)
    return torch.cat([schedule.sigmas[steps], torch.zeros(1, dtype=torch.float64)])


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM noise levels (Karras et al. 2022, eq. 5), descending, with a final 0: shape (num_steps + 1,), float64.

    ``sigma_i = (sigma_max^(1/rho) + i / (n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def log_snr_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Noise levels uniform in log-SNR (``-2 log sigma``) from sigma_max to sigma_min, descending, with a final 0:
    shape (num_steps + 1,), float64.

    DPM-Solver's step ``h = log(sigma_i / sigma_(i+1))`` is then the same for every step (the "logSNR" skip
    type of Lu et al. 2022), which keeps a multistep solver's extrapolation accurate. A Karras grid crowds
    its steps at both ends instead; when the schedule's sigma_max lies far above the data's scale (2e4 for
    the cosine schedule, against a data std of about 4), it leaves too few steps where the image forms:
    DPM-Solver++ at 20 steps then gives images about 10 % too noisy.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64)
    return torch.cat([log_sigmas.exp(), torch.zeros(1, dtype=torch.float64)])
