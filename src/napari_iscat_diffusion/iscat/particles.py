"""Particles: materials, iSCAT contrast of a sphere, particle classes and their random sampling.

Contrast model (a Rayleigh scatterer against a reflected reference): the scattered amplitude is
proportional to the polarisability ``alpha ~ d^3 (eps_p - eps_m) / (eps_p + 2 eps_m)`` times ``k^2``, the
reference amplitude to the Fresnel reflectivity ``r = (n_immersion - n_medium) / (n_immersion + n_medium)``
of the coverslip. The in-focus peak of the cross term is therefore

    c_lin = C_REF * (d / 50 nm)^3 * |K| / |K_ps| * (520 nm / lambda)^2 * r_ref / r

anchored at ``C_REF = 1e-2`` for a 50 nm polystyrene sphere in water on glass at 520 nm (the design brief), where
``K`` is the Clausius-Mossotti factor of the particle in the medium and ``K_ps``, ``r_ref`` those of the
anchor. Large particles leave the Rayleigh regime and their contrast saturates: ``c = c_lin / (1 + c_lin /
c_sat)``. This form keeps the d^3 law for ``c << c_sat`` (relative deviation ``c_lin / c_sat``) and, unlike
``tanh``, approaches ``c_sat`` slowly enough that 300 nm and 600 nm particles still differ (0.30 vs 0.34 at the
defaults). The phase of ``K`` (non-zero for absorbing gold) is the particle's scattering phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REFERENCE_CONTRAST = 1e-2
_REFERENCE_DIAMETER_NM = 50.0
_REFERENCE_WAVELENGTH_NM = 520.0
_REFERENCE_N_PARTICLE = 1.59  # polystyrene
_REFERENCE_N_MEDIUM = 1.33  # water
_REFERENCE_N_IMMERSION = 1.518  # glass coverslip

# Real refractive indices in the visible (dispersion neglected).
DIELECTRIC_INDEX: dict[str, float] = {
    "polystyrene": 1.59,
    "protein": 1.45,
    "virus": 1.48,  # enveloped and protein-capsid viruses, about 1.46-1.50
    "silica": 1.46,
    "lipid": 1.46,
}

# Gold, Johnson & Christy, Phys. Rev. B 6, 4370 (1972): wavelength (nm), n, k; interpolated linearly.
_GOLD_JC = np.array(
    [
        (397.4, 1.47, 1.952),
        (413.3, 1.46, 1.958),
        (430.5, 1.45, 1.948),
        (450.9, 1.38, 1.914),
        (471.4, 1.31, 1.849),
        (495.9, 1.04, 1.833),
        (520.9, 0.62, 2.081),
        (548.6, 0.43, 2.455),
        (582.1, 0.29, 2.863),
        (616.8, 0.21, 3.272),
        (659.5, 0.14, 3.697),
        (704.5, 0.13, 4.103),
        (756.0, 0.14, 4.542),
        (821.1, 0.16, 5.083),
        (892.0, 0.17, 5.663),
    ]
)

MATERIALS: tuple[str, ...] = (*DIELECTRIC_INDEX, "gold")

PARTICLE_DTYPE = np.dtype(
    [
        ("x_px", np.float64),
        ("y_px", np.float64),
        ("z_nm", np.float64),
        ("diameter_nm", np.float64),
        ("material", "U16"),
        ("label", np.int32),
        ("contrast", np.float64),
    ]
)


def refractive_index(material: str, wavelength_nm: float) -> complex:
    """Complex refractive index of ``material`` (one of :data:`MATERIALS`) at ``wavelength_nm`` (nm)."""
    if material in DIELECTRIC_INDEX:
        return complex(DIELECTRIC_INDEX[material])
    if material == "gold":
        lo, hi = _GOLD_JC[0, 0], _GOLD_JC[-1, 0]
        if not lo <= wavelength_nm <= hi:
            raise ValueError(
                f"gold optical constants are tabulated for {lo}-{hi} nm, got wavelength {wavelength_nm} nm"
            )
        n = np.interp(wavelength_nm, _GOLD_JC[:, 0], _GOLD_JC[:, 1])
        k = np.interp(wavelength_nm, _GOLD_JC[:, 0], _GOLD_JC[:, 2])
        return complex(n, k)
    raise ValueError(f"unknown material {material!r}; choose one of {', '.join(MATERIALS)}")


def clausius_mossotti(n_particle: complex, n_medium: float) -> complex:
    """Polarisability factor ``(eps_p - eps_m) / (eps_p + 2 eps_m)`` of a sphere (dimensionless)."""
    eps_p, eps_m = n_particle**2, n_medium**2
    return (eps_p - eps_m) / (eps_p + 2 * eps_m)


def _fresnel_r(n_immersion: float, n_medium: float) -> float:
    return abs(n_immersion - n_medium) / (n_immersion + n_medium)


def particle_contrast(
    diameter_nm: np.ndarray,
    material: str,
    *,
    wavelength_nm: float,
    n_medium: float,
    n_immersion: float,
    scale: float = 1.0,
    saturation: float = 0.35,
) -> tuple[np.ndarray, float]:
    """In-focus peak iSCAT contrast of spheres of one material (see the module docstring for the model).

    Args:
        diameter_nm: particle diameters (nm).
        material: one of :data:`MATERIALS`.
        wavelength_nm: vacuum wavelength (nm).
        n_medium: refractive index of the medium.
        n_immersion: refractive index of the coverslip/immersion (sets the reference reflectivity).
        scale: setup factor multiplying the linear contrast (collection efficiency, reference attenuation).
        saturation: largest contrast approached by big particles (``c_sat``).

    Returns:
        (contrast, phase_rad): contrast magnitude shaped like ``diameter_nm`` and the scattering phase (rad).
    """
    factor = clausius_mossotti(refractive_index(material, wavelength_nm), n_medium)
    reference = abs(clausius_mossotti(_REFERENCE_N_PARTICLE, _REFERENCE_N_MEDIUM))
    r_reference = _fresnel_r(_REFERENCE_N_IMMERSION, _REFERENCE_N_MEDIUM)
    linear = (
        scale
        * REFERENCE_CONTRAST
        * (np.asarray(diameter_nm, dtype=np.float64) / _REFERENCE_DIAMETER_NM) ** 3
        * (abs(factor) / reference)
        * (_REFERENCE_WAVELENGTH_NM / wavelength_nm) ** 2
        * (r_reference / _fresnel_r(n_immersion, n_medium))
    )
    return linear / (1 + linear / saturation), math.atan2(factor.imag, factor.real)


@dataclass(frozen=True)
class ParticleClass:
    """A population of particles.

    Attributes:
        name: a short name (for example ``"virus-80"``).
        material: one of :data:`MATERIALS`.
        diameter_mean_nm: mean diameter (nm).
        diameter_std_nm: standard deviation of the diameter (nm); diameters are log-normal with this mean and
            standard deviation, so they stay positive.
        proportion: relative frequency among the classes (normalised over all classes).
    """

    name: str
    material: str
    diameter_mean_nm: float
    diameter_std_nm: float
    proportion: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"particle_classes: name must be a non-empty string, got {self.name!r}")
        if self.material not in MATERIALS:
            raise ValueError(
                f"particle_classes[{self.name}].material: unknown material {self.material!r}; "
                f"choose one of {', '.join(MATERIALS)}"
            )
        checks = (
            ("diameter_mean_nm", self.diameter_mean_nm > 0),
            ("diameter_std_nm", self.diameter_std_nm >= 0),
            ("proportion", self.proportion >= 0),
        )
        for field, ok in checks:
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and ok):
                raise ValueError(f"particle_classes[{self.name}].{field}: invalid value {value!r}")


def sample_diameters(
    classes: tuple[ParticleClass, ...], count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` particles: class index by proportion, diameter (nm) log-normal per class.

    Returns:
        (class_index, diameter_nm): int64 and float64 arrays of length ``count``.
    """
    proportions = np.array([c.proportion for c in classes], dtype=np.float64)
    index = rng.choice(len(classes), size=count, p=proportions / proportions.sum())
    mean = np.array([c.diameter_mean_nm for c in classes])[index]
    std = np.array([c.diameter_std_nm for c in classes])[index]
    # Log-normal with exactly this mean and standard deviation.
    sigma2 = np.log1p((std / mean) ** 2)
    diameters = np.exp(np.log(mean) - sigma2 / 2 + np.sqrt(sigma2) * rng.standard_normal(count))
    return index.astype(np.int64), diameters
