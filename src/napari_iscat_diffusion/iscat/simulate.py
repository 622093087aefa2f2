"""Simulate labelled iSCAT images: parameters, the ``simulate`` entry point and command-line helpers.

One image is built as follows (see docs/simulator.md):

1. particles: count, positions (dart throwing, ``min_distance_px`` apart), class, diameter, height ``z``;
   the mask label comes from the diameter's size bin, not from the class the particle was drawn from;
2. field relative to the reference, per focal plane ``f``: ``A = sum_p (c_p / 2) exp(i phi_p) h(r - r_p; z_p, f)``
   with ``phi_p`` = global reference phase + scattering phase, and ``h`` the complex PSF (optics.py);
3. intensity ``|1 + S + A|^2`` (``S``: static speckle), times the illumination envelope and the photon budget,
   exposed on the camera (shot noise, read noise, column gains);
4. output ``raw`` counts or ``contrast = I / I_background - 1`` with the smooth particle-free background.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .background import counts_to_contrast, expose, illumination_envelope, speckle_field
from .masks import classify_by_size, draw_blobs, random_positions
from .optics import Optics, psf_table, render_field
from .particles import MATERIALS, PARTICLE_DTYPE, ParticleClass, particle_contrast, refractive_index, sample_diameters

OUTPUTS: tuple[str, ...] = ("contrast", "raw")

DEFAULT_PARTICLE_CLASSES: tuple[ParticleClass, ...] = (
    ParticleClass("virus-80", "virus", 80.0, 8.0, 0.5),
    ParticleClass("polystyrene-300", "polystyrene", 300.0, 20.0, 0.3),
    ParticleClass("polystyrene-600", "polystyrene", 600.0, 30.0, 0.2),
)

# The largest image side (px): a 2048 px image takes about 0.3 GB while it is simulated, growing with its area,
# so 4096 px (about 1 GB) covers the largest camera frames without letting a typo exhaust the memory.
MAX_IMAGE_SIDE = 4096

# PSF table grid step in defocus (nm): with the round-trip phase factored out, linear interpolation between
# grid points is accurate to 0.3 %.
_STEP_NM = 10.0
# The beam centre wanders by up to this fraction of the image size from image to image.
_BEAM_CENTRE_JITTER = 0.2


@dataclass(frozen=True)
class SimulationParameters:
    """Everything that defines a simulated iSCAT image; lengths in nm unless the name says px.

    Attributes:
        image_size: (H, W) in pixels.
        pixel_size_nm: camera pixel size in the sample plane (nm); below the Nyquist limit ``lambda / (2 NA)``.
        wavelength_nm: illumination wavelength in vacuum (nm).
        numerical_aperture: objective NA (at most ``n_immersion``); light is collected up to ``min(NA, n_medium)``.
        n_medium: refractive index of the sample medium.
        n_immersion: refractive index of coverslip and immersion oil; with ``n_medium`` it sets the reference
            reflectivity and so the contrast scale.
        particle_classes: particle populations (name, material, diameter mean/std in nm, proportion).
        size_bins_nm: increasing diameter edges (nm) between mask labels 1..len+1; None: midpoints between the
            sorted class means.
        particles_per_image: (min, max) particles drawn per image, inclusive (fewer when the image is full).
        z_range_nm: (lo, hi) range of particle heights above the coverslip (nm), drawn uniformly.
        focal_planes_nm: heights of the focal planes (nm); more than one gives a (Z, H, W) focal stack.
        min_distance_px: smallest distance between particle centres (px); None: ``2 * mask_radius + 2`` so that
            mask blobs never touch.
        mask_radius_px: radius of each mask blob (px, >= 1); None: half the Airy radius ``0.61 lambda / NA_eff``.
        photons_per_pixel: detected photons per pixel of the bare reference at the beam centre (sets shot noise:
            contrast noise ``1 / sqrt(photons_per_pixel)``).
        read_noise_e: camera read noise (electrons rms).
        column_noise: standard deviation of the relative gain of each camera column (fixed-pattern noise).
        speckle_strength: standard deviation of the static speckle in the contrast image.
        beam_waist_nm: 1/e^2 radius of the Gaussian illumination (nm); ``inf`` for flat illumination.
        reference_phase_rad: global phase of the reference against the scattered light; None: uniform random per
            image (it depends on the setup's reflection and path phases).
        contrast_scale: factor on every particle's linear contrast (setup-specific collection efficiency).
        contrast_saturation: contrast approached by very large particles.
        camera_gain_adu_per_e: conversion gain (ADU per electron) of the ``raw`` output.
        camera_offset_adu: camera offset (ADU) of the ``raw`` output.
        output: ``"contrast"`` (background-normalised, around 0) or ``"raw"`` (camera counts).
    """

    image_size: tuple[int, int] = (256, 256)
    pixel_size_nm: float = 60.0
    wavelength_nm: float = 520.0
    numerical_aperture: float = 1.4
    n_medium: float = 1.33
    n_immersion: float = 1.518
    particle_classes: tuple[ParticleClass, ...] = DEFAULT_PARTICLE_CLASSES
    size_bins_nm: tuple[float, ...] | None = None
    particles_per_image: tuple[int, int] = (5, 30)
    z_range_nm: tuple[float, float] = (0.0, 400.0)
    focal_planes_nm: tuple[float, ...] = (0.0,)
    min_distance_px: float | None = None
    mask_radius_px: float | None = None
    photons_per_pixel: float = 1e5
    read_noise_e: float = 2.0
    column_noise: float = 5e-4
    speckle_strength: float = 2e-3
    beam_waist_nm: float = 20000.0
    reference_phase_rad: float | None = None
    contrast_scale: float = 1.0
    contrast_saturation: float = 0.35
    camera_gain_adu_per_e: float = 0.5
    camera_offset_adu: float = 100.0
    output: str = "contrast"

    def __post_init__(self) -> None:
        # Accept lists (JSON, argparse) and plain numbers; store tuples so the parameters stay hashable.
        for name in ("image_size", "particles_per_image", "z_range_nm", "focal_planes_nm", "size_bins_nm"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _tuple(name, value))
        classes = self.particle_classes
        if not isinstance(classes, (tuple, list)) or not all(isinstance(c, ParticleClass) for c in classes):
            raise ValueError("particle_classes must be a sequence of ParticleClass")
        object.__setattr__(self, "particle_classes", tuple(classes))
        _validate(self)
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "particles_per_image", tuple(int(n) for n in self.particles_per_image))

    @property
    def optics(self) -> Optics:
        """The imaging optics."""
        return Optics(self.wavelength_nm, self.numerical_aperture, self.n_medium, self.pixel_size_nm)

    @property
    def bins_nm(self) -> tuple[float, ...]:
        """Size-bin edges (nm) in use: ``size_bins_nm`` or the midpoints between the sorted class means."""
        if self.size_bins_nm is not None:
            return self.size_bins_nm
        means = sorted({c.diameter_mean_nm for c in self.particle_classes})
        return tuple((a + b) / 2 for a, b in itertools.pairwise(means))

    @property
    def num_labels(self) -> int:
        """Number of mask labels K (labels 1..K)."""
        return len(self.bins_nm) + 1

    @property
    def mask_radius(self) -> float:
        """Mask blob radius in use (px)."""
        if self.mask_radius_px is not None:
            return self.mask_radius_px
        return max(1.0, 0.5 * self.optics.airy_radius_nm / self.pixel_size_nm)

    @property
    def min_distance(self) -> float:
        """Minimum distance between particles in use (px)."""
        return self.min_distance_px if self.min_distance_px is not None else 2 * self.mask_radius + 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for tuples, particle classes as dicts); :meth:`from_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["particle_classes"] = [dataclasses.asdict(c) for c in self.particle_classes]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulationParameters:
        """Parameters from a dict such as :meth:`to_dict` gives; missing keys take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown simulation parameter(s): {', '.join(unknown)}")
        values = dict(data)
        if "particle_classes" in values:
            values["particle_classes"] = tuple(_particle_class(c) for c in values["particle_classes"])
        return cls(**values)


def _tuple(name: str, value: Any) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence, got {value!r}")
    return tuple(value)


def _particle_class(value: Any) -> ParticleClass:
    if isinstance(value, ParticleClass):
        return value
    if isinstance(value, Mapping):
        try:
            return ParticleClass(**value)
        except TypeError as err:
            raise ValueError(f"particle_classes: {err}") from None
    raise ValueError(f"particle_classes entries must be ParticleClass or dicts, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check(name: str, value: Any, ok: bool, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value) and int(value) == value


def _validate(p: SimulationParameters) -> None:
    """Raise ValueError naming the first invalid field."""
    size = p.image_size
    _check(
        "image_size",
        size,
        len(size) == 2 and all(_whole(s) and 8 <= s <= MAX_IMAGE_SIDE for s in size),
        f"(H, W) integers from 8 to {MAX_IMAGE_SIDE}",
    )
    _check("wavelength_nm", p.wavelength_nm, _finite(p.wavelength_nm) and 200 <= p.wavelength_nm <= 2000, "200..2000")
    _check("n_medium", p.n_medium, _finite(p.n_medium) and p.n_medium >= 1, "a refractive index >= 1")
    n_imm = p.n_immersion
    _check(
        "n_immersion",
        n_imm,
        _finite(n_imm) and n_imm >= 1 and abs(n_imm - p.n_medium) >= 0.01,
        "a refractive index >= 1 that differs from n_medium (the reference is the reflection between them)",
    )
    na = p.numerical_aperture
    _check("numerical_aperture", na, _finite(na) and 0 < na <= n_imm, f"in (0, n_immersion = {n_imm}]")
    nyquist = p.wavelength_nm / (2 * min(na, p.n_medium))
    _check(
        "pixel_size_nm",
        p.pixel_size_nm,
        _finite(p.pixel_size_nm) and 0 < p.pixel_size_nm < nyquist,
        f"positive and below the Nyquist limit lambda / (2 NA_eff) = {nyquist:.1f} nm",
    )
    classes = p.particle_classes
    _check(
        "particle_classes",
        classes,
        len(classes) > 0 and sum(c.proportion for c in classes) > 0,
        "non-empty with proportions that are not all 0",
    )
    if any(c.material == "gold" for c in classes):
        refractive_index("gold", p.wavelength_nm)  # raises for wavelengths outside the gold table
    bins = p.size_bins_nm
    _check(
        "size_bins_nm",
        bins,
        bins is None
        or (
            len(bins) < 255
            and all(_finite(b) and b > 0 for b in bins)
            and all(a < b for a, b in itertools.pairwise(bins))
        ),
        "None or fewer than 255 positive, strictly increasing diameters in nm",
    )
    counts = p.particles_per_image
    _check(
        "particles_per_image",
        counts,
        len(counts) == 2 and all(_whole(n) and n >= 0 for n in counts) and counts[0] <= counts[1],
        "(min, max) integers with 0 <= min <= max",
    )
    z = p.z_range_nm
    _check(
        "z_range_nm",
        z,
        len(z) == 2 and all(_finite(v) for v in z) and 0 <= z[0] <= z[1],
        "(lo, hi) heights in nm with 0 <= lo <= hi",
    )
    planes = p.focal_planes_nm
    _check("focal_planes_nm", planes, len(planes) > 0 and all(_finite(f) for f in planes), "non-empty and finite")
    distance = p.min_distance_px
    _check("min_distance_px", distance, distance is None or (_finite(distance) and distance >= 0), "None or >= 0")
    radius = p.mask_radius_px
    _check(
        "mask_radius_px",
        radius,
        radius is None or (_finite(radius) and radius >= 1),
        "None or >= 1 (so that every blob covers its particle's pixel)",
    )
    photons = p.photons_per_pixel
    _check("photons_per_pixel", photons, _finite(photons) and photons >= 1, ">= 1")
    for name, upper in (("read_noise_e", math.inf), ("column_noise", 0.5), ("speckle_strength", 0.5)):
        value = getattr(p, name)
        _check(name, value, _finite(value) and 0 <= value < upper, f"in [0, {upper})")
    waist = p.beam_waist_nm
    _check("beam_waist_nm", waist, _is_number(waist) and waist > 0, "> 0 (inf for flat illumination)")
    phase = p.reference_phase_rad
    _check("reference_phase_rad", phase, phase is None or _finite(phase), "None or a finite angle in radians")
    for name in ("contrast_scale", "contrast_saturation", "camera_gain_adu_per_e"):
        value = getattr(p, name)
        _check(name, value, _finite(value) and value > 0, "> 0")
    offset = p.camera_offset_adu
    _check("camera_offset_adu", offset, _finite(offset) and offset >= 0, ">= 0")
    _check("output", p.output, p.output in OUTPUTS, f"one of {', '.join(OUTPUTS)}")


@dataclass(frozen=True, eq=False)
class SimulatedImage:
    """One simulated image with its mask and particle table.

    Attributes:
        image: float32 (H, W), or (Z, H, W) for more than one focal plane; contrast or camera counts (ADU).
        mask: uint8 (H, W) label image, 0 background, 1..K size class.
        particles: structured array (:data:`~.particles.PARTICLE_DTYPE`), one row per particle: position
            ``x_px, y_px`` (pixel (i, j) centred at (i, j)), height ``z_nm`` above the coverslip, ``diameter_nm``,
            ``material``, mask ``label`` and ``contrast``: the magnitude of its in-focus peak cross-term contrast
            (its sign in the image depends on the reference phase, its height and the focus).
    """

    image: np.ndarray
    mask: np.ndarray
    particles: np.ndarray


def simulate(params: SimulationParameters, seed: int | np.random.Generator) -> SimulatedImage:
    """Simulate one labelled iSCAT image; the same seed and parameters give the same result."""
    rng = np.random.default_rng(seed)
    particles, scattering_phase = _sample_particles(params, rng)
    reference_phase = rng.uniform(0, 2 * np.pi) if params.reference_phase_rad is None else params.reference_phase_rad
    image = _render_image(params, particles, scattering_phase + reference_phase, rng)
    positions = np.stack([particles["y_px"], particles["x_px"]], axis=1)
    mask = draw_blobs(params.image_size, positions, particles["label"], params.mask_radius)
    return SimulatedImage(image=image[0] if len(image) == 1 else image, mask=mask, particles=particles)


def _sample_particles(params: SimulationParameters, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Particle table (:data:`PARTICLE_DTYPE`) and scattering phase (rad) of each particle."""
    low, high = params.particles_per_image
    positions = random_positions(
        params.image_size, int(rng.integers(low, high, endpoint=True)), params.min_distance, rng
    )
    n = len(positions)
    class_index, diameters = sample_diameters(params.particle_classes, n, rng)
    particles = np.zeros(n, dtype=PARTICLE_DTYPE)
    particles["y_px"], particles["x_px"] = positions[:, 0], positions[:, 1]
    particles["z_nm"] = rng.uniform(params.z_range_nm[0], params.z_range_nm[1], n)
    particles["diameter_nm"] = diameters
    particles["label"] = classify_by_size(diameters, params.bins_nm)
    phase = np.zeros(n)
    for i, particle_class in enumerate(params.particle_classes):
        chosen = class_index == i
        particles["material"][chosen] = particle_class.material
        particles["contrast"][chosen], phase[chosen] = particle_contrast(
            diameters[chosen],
            particle_class.material,
            wavelength_nm=params.wavelength_nm,
            n_medium=params.n_medium,
            n_immersion=params.n_immersion,
            scale=params.contrast_scale,
            saturation=params.contrast_saturation,
        )
    return particles, phase


def _render_image(
    params: SimulationParameters, particles: np.ndarray, phase: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The (Z, H, W) float32 image of the particles, one plane per focal plane, in the requested output."""
    shape, optics = params.image_size, params.optics
    planes = np.asarray(params.focal_planes_nm, dtype=np.float64)
    heights = particles["z_nm"]
    positions = np.stack([particles["y_px"], particles["x_px"]], axis=1)
    # Scattered field relative to the reference: amplitude c/2, so that the cross term 2 Re A peaks at c in
    # focus; the round-trip phase 2 k_m z enters here as a scalar per particle.
    amplitudes = 0.5 * particles["contrast"] * np.exp(1j * (phase + 2 * optics.k_medium * heights))
    table = psf_table(optics, (params.z_range_nm[0] - planes.max(), params.z_range_nm[1] - planes.min()), _STEP_NM)
    field = np.stack([render_field(table, shape, positions, heights - f, amplitudes) for f in planes])
    if params.speckle_strength > 0:
        field += speckle_field(optics, shape, params.speckle_strength, planes, rng)
    field += 1  # the reference
    intensity = field.real**2 + field.imag**2

    centre = (np.asarray(shape) - 1) / 2 + _BEAM_CENTRE_JITTER * np.asarray(shape) * rng.uniform(-1, 1, 2)
    envelope = illumination_envelope(shape, params.beam_waist_nm / params.pixel_size_nm, tuple(centre))
    column_gain = 1 + params.column_noise * rng.standard_normal(shape[1])
    camera = {
        "photons_per_pixel": params.photons_per_pixel,
        "gain_adu_per_e": params.camera_gain_adu_per_e,
        "offset_adu": params.camera_offset_adu,
    }
    counts = expose(intensity, envelope, column_gain, read_noise_e=params.read_noise_e, rng=rng, **camera)
    return counts_to_contrast(counts, envelope, **camera) if params.output == "contrast" else counts


# --- command line -------------------------------------------------------------------------------------------

# flag -> (field, argparse options); defaults are None so that only flags given on the command line override.
# "shown" replaces the default in the help where the default is computed.
_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--size": ("image_size", {"type": int, "nargs": 2, "metavar": ("H", "W"), "help": "image size in pixels"}),
    "--pixel-size-nm": ("pixel_size_nm", {"type": float, "metavar": "NM", "help": "pixel size in the sample"}),
    "--wavelength-nm": ("wavelength_nm", {"type": float, "metavar": "NM", "help": "illumination wavelength"}),
    "--na": ("numerical_aperture", {"type": float, "metavar": "NA", "help": "numerical aperture"}),
    "--n-medium": ("n_medium", {"type": float, "metavar": "N", "help": "refractive index of the medium"}),
    "--n-immersion": ("n_immersion", {"type": float, "metavar": "N", "help": "refractive index of the coverslip"}),
    "--particles": (
        "particles_per_image",
        {"type": int, "nargs": 2, "metavar": ("MIN", "MAX"), "help": "particles per image"},
    ),
    "--z-range-nm": (
        "z_range_nm",
        {"type": float, "nargs": 2, "metavar": ("LO", "HI"), "help": "particle heights above the coverslip"},
    ),
    "--planes-nm": (
        "focal_planes_nm",
        {"type": float, "nargs": "+", "metavar": "F", "help": "focal-plane heights; several give a focal stack"},
    ),
    "--size-bins-nm": (
        "size_bins_nm",
        {
            "type": float,
            "nargs": "+",
            "metavar": "D",
            "help": "diameter edges between mask labels",
            "shown": "midpoints between the class means",
        },
    ),
    "--photons-per-pixel": (
        "photons_per_pixel",
        {"type": float, "metavar": "N", "help": "detected photons per pixel of the reference"},
    ),
    "--read-noise-e": ("read_noise_e", {"type": float, "metavar": "E", "help": "camera read noise (electrons rms)"}),
    "--column-noise": ("column_noise", {"type": float, "metavar": "X", "help": "relative spread of column gains"}),
    "--speckle-strength": ("speckle_strength", {"type": float, "metavar": "X", "help": "speckle std in contrast"}),
    "--beam-waist-nm": (
        "beam_waist_nm",
        {"type": float, "metavar": "NM", "help": "illumination beam waist; inf for flat illumination"},
    ),
    "--reference-phase-rad": (
        "reference_phase_rad",
        {"type": float, "metavar": "RAD", "help": "fixed reference phase", "shown": "random per image"},
    ),
    "--contrast-scale": ("contrast_scale", {"type": float, "metavar": "X", "help": "factor on every contrast"}),
    "--output": ("output", {"choices": OUTPUTS, "help": "contrast (around 0) or raw camera counts"}),
    "--mask-radius-px": (
        "mask_radius_px",
        {"type": float, "metavar": "PX", "help": "mask blob radius", "shown": "half the Airy radius"},
    ),
    "--min-distance-px": (
        "min_distance_px",
        {"type": float, "metavar": "PX", "help": "smallest particle distance", "shown": "2 x mask radius + 2"},
    ),
}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulation flags (and ``--config JSON``, ``--particle-class``) to ``parser``."""
    group = parser.add_argument_group("simulation parameters (defaults in brackets; lengths in nm)")
    defaults = SimulationParameters().to_dict()
    group.add_argument(
        "--config", type=Path, default=None, help="JSON file of simulation parameters; flags given here override it"
    )
    for flag, (field, options) in _FLAGS.items():
        options = dict(options)
        default = defaults[field]
        shown = options.pop("shown", " ".join(map(str, default)) if isinstance(default, list) else default)
        options["help"] = f"{options['help']} [{shown}]"
        group.add_argument(flag, dest=f"sim_{field}", default=None, **options)
    group.add_argument(
        "--particle-class",
        dest="sim_particle_classes",
        nargs=5,
        action="append",
        default=None,
        metavar=("NAME", "MATERIAL", "MEAN_NM", "STD_NM", "PROPORTION"),
        help="a particle class; repeat for several (replaces the defaults: "
        + ", ".join(f"{c.name} {c.material} {c.diameter_mean_nm:g}" for c in DEFAULT_PARTICLE_CLASSES)
        + f"; materials: {', '.join(MATERIALS)})",
    )


def parameters_from_cli(args: argparse.Namespace) -> SimulationParameters:
    """Build :class:`SimulationParameters` from parsed arguments (``--config`` first, then the flags)."""
    values: dict[str, Any] = {}
    if args.config is not None:
        if Path(args.config).exists() and not Path(args.config).is_file():  # a FIFO or a device would block
            raise ValueError(f"--config {args.config}: not a regular file; expected a JSON file")
        try:
            values = json.loads(Path(args.config).read_text())
        except (ValueError, RecursionError) as err:  # ValueError covers bad JSON and text that is not UTF-8
            raise ValueError(f"--config {args.config}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {args.config}: expected a JSON object of simulation parameters")
    for field, _ in _FLAGS.values():
        value = getattr(args, f"sim_{field}")
        if value is not None:
            values[field] = value
    if args.sim_particle_classes is not None:
        values["particle_classes"] = [_class_from_strings(entry) for entry in args.sim_particle_classes]
    return SimulationParameters.from_dict(values)


def _class_from_strings(entry: list[str]) -> ParticleClass:
    name, material, mean, std, proportion = entry
    try:
        numbers = [float(mean), float(std), float(proportion)]
    except ValueError:
        raise ValueError(
            f"--particle-class {' '.join(entry)}: MEAN_NM, STD_NM and PROPORTION must be numbers"
        ) from None
    return ParticleClass(name, material, *numbers)
