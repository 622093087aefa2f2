"""The iSCAT physics simulator: PSF, contrast law, noise budget, masks, determinism, parameters."""

import argparse
import json
import math
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from napari_iscat_diffusion.iscat.optics import Optics, amplitude_psf, psf_table, render_field
from napari_iscat_diffusion.iscat.particles import ParticleClass, particle_contrast
from napari_iscat_diffusion.iscat.simulate import (
    SimulationParameters,
    add_cli_arguments,
    parameters_from_cli,
    simulate,
)

WAVELENGTH = 520.0
N_WATER = 1.33

# A quiet, flat setup: one kind of particle, no speckle, flat illumination, no camera patterns.
QUIET = {
    "speckle_strength": 0.0,
    "beam_waist_nm": math.inf,
    "column_noise": 0.0,
    "read_noise_e": 0.0,
    "reference_phase_rad": 0.0,
}


def _zero_crossings(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linearly interpolated positions where ``values`` changes sign."""
    i = np.nonzero(np.sign(values[:-1]) != np.sign(values[1:]))[0]
    return grid[i] + (grid[i + 1] - grid[i]) * values[i] / (values[i] - values[i + 1])


# --- optics ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("na", "n_medium", "effective_na"), [(1.2, N_WATER, 1.2), (1.4, N_WATER, N_WATER)])
def test_in_focus_first_dark_ring_at_airy_radius(na, n_medium, effective_na):
    pixel = 20.0
    optics = Optics(WAVELENGTH, na, n_medium, pixel)
    psf = amplitude_psf(optics, 0.0, 64)[0]
    assert psf[32, 32] == pytest.approx(1.0)
    assert np.abs(psf.imag).max() < 1e-9  # in focus, at height 0, the field is real
    # The amplitude changes sign at its zero; interpolate the crossing along a row.
    profile = psf[32, 32:].real
    zero_px = _zero_crossings(profile, np.arange(len(profile), dtype=float))[0]
    expected_px = 0.61 * WAVELENGTH / effective_na / pixel
    assert zero_px == pytest.approx(expected_px, abs=0.1)  # 2 nm: pixel integration and interpolation


def test_centre_sign_flips_with_height_every_quarter_wavelength():
    na = 1.2
    optics = Optics(WAVELENGTH, na, N_WATER, 60.0)
    heights = np.arange(0.0, 260.0, 1.0)
    centre = amplitude_psf(optics, heights, 8)[:, 4, 4].real
    quarter = WAVELENGTH / (4 * N_WATER)  # 97.7 nm
    assert centre[0] > 0
    assert centre[round(quarter)] < 0  # contrast inverted a quarter wavelength (in the medium) higher

    # Independent expectation: the on-axis field of a uniform pupil, integrated over k_z = u, is
    # int exp(i (k_m + u) z) u du for u from k_m cos(theta_max) to k_m. Its real part changes sign at the
    # flips. Paraxially they would sit at lambda/(8n) + m lambda/(4n); high-NA components have k_z < k_m,
    # which stretches the spacing by about 14 % at NA 1.2. Tolerance 2 nm: 1 nm height grid plus the
    # pixel-integration weighting of the pupil, which the quadrature leaves out.
    k_m = 2 * math.pi * N_WATER / WAVELENGTH
    u = np.linspace(k_m * math.sqrt(1 - (na / N_WATER) ** 2), k_m, 4001)
    fine = np.arange(0.0, 260.0, 0.25)
    on_axis = np.trapezoid(np.cos(np.outer(fine, k_m + u)) * u, u, axis=1)
    expected = _zero_crossings(on_axis, fine)
    measured = _zero_crossings(centre, heights)
    assert len(measured) == len(expected) >= 2
    np.testing.assert_allclose(measured, expected, atol=2.0)
    assert quarter < np.diff(measured)[0] < 1.25 * quarter


def test_rendered_particle_sits_at_its_subpixel_position():
    optics = Optics(WAVELENGTH, 1.4, N_WATER, 60.0)
    table = psf_table(optics, (0.0, 100.0))
    # Half-pixel positions: by symmetry of the PSF the four surrounding pixels get the same value.
    field = render_field(table, (40, 40), np.array([[20.5, 17.5]]), np.array([0.0]), np.array([1.0 + 0j]))
    np.testing.assert_allclose(field[20:22, 17:19], np.full((2, 2), field[20, 17]), atol=1e-5)
    assert abs(field[20, 17]) > 0.5
    # Other offsets: a parabola through the three brightest pixels of each axis finds the centre.
    position = np.array([20.3, 17.8])
    field = np.abs(render_field(table, (40, 40), position[None], np.array([0.0]), np.array([1.0 + 0j])))
    peak = np.unravel_index(np.argmax(field), field.shape)
    for axis, line in enumerate((field[:, peak[1]], field[peak[0], :])):
        left, mid, right = line[peak[axis] - 1 : peak[axis] + 2]
        vertex = peak[axis] + 0.5 * (left - right) / (left - 2 * mid + right)
        assert vertex == pytest.approx(position[axis], abs=0.05)
    # The table reproduces the directly computed PSF (same pixel grid) up to its window and z interpolation.
    direct = amplitude_psf(optics, 0.0, 16)[0]
    on_grid = render_field(table, (40, 40), np.array([[20.0, 17.0]]), np.array([5.0]), np.array([1.0 + 0j]))
    direct_5nm = amplitude_psf(optics, 5.0, 16)[0] * np.exp(-2j * optics.k_medium * 5.0)
    assert abs(direct[8, 8] - 1) < 1e-9
    np.testing.assert_allclose(on_grid[12:28, 9:25], direct_5nm, atol=5e-3)


# --- contrast -------------------------------------------------------------------------------------------------


def _peak_contrast(diameter_nm: float, material: str = "polystyrene") -> float:
    """Image value at a single in-focus particle, noise made negligible by a huge photon budget."""
    params = SimulationParameters(
        image_size=(48, 48),
        particle_classes=(ParticleClass("p", material, diameter_nm, 0.0),),
        particles_per_image=(1, 1),
        z_range_nm=(0.0, 0.0),
        photons_per_pixel=1e12,
        **QUIET,
    )
    result = simulate(params, 7)  # same seed: same position for every diameter
    (particle,) = result.particles
    return float(result.image[round(particle["y_px"]), round(particle["x_px"])])


def test_contrast_scales_with_diameter_cubed_for_small_particles():
    diameters = np.array([20.0, 30.0, 40.0, 50.0, 60.0])
    peaks = np.array([_peak_contrast(d) for d in diameters])
    slope = np.polyfit(np.log(diameters), np.log(peaks), 1)[0]
    assert slope == pytest.approx(3.0, abs=0.1)


def test_contrast_magnitudes_and_saturation():
    def contrast(d, material="polystyrene"):
        c, _ = particle_contrast(np.array(d), material, wavelength_nm=WAVELENGTH, n_medium=N_WATER, n_immersion=1.518)
        return float(c)

    assert contrast(50) == pytest.approx(1e-2, rel=0.05)
    assert 1e-5 < contrast(10, "protein") < contrast(20, "protein") < 1e-3
    assert contrast(20, "gold") > 5 * contrast(20, "polystyrene")  # metals scatter far more
    large = [contrast(d) for d in (300, 600, 1200)]
    assert 0.25 < large[0] < large[1] < large[2] < 0.35  # saturating towards c_sat = 0.35
    assert large[1] / large[0] < 1.25  # instead of 8 for d^3
    # The image shows the same saturation.
    assert _peak_contrast(600) / _peak_contrast(300) < 1.3


# --- noise ----------------------------------------------------------------------------------------------------


def _blank(**overrides) -> SimulationParameters:
    return SimulationParameters(**{"image_size": (256, 256), "particles_per_image": (0, 0), **QUIET, **overrides})


def test_contrast_noise_matches_photon_budget():
    photons = 1e4
    image = simulate(_blank(photons_per_pixel=photons), 3).image
    assert abs(image.mean()) < 1e-3
    # 65536 pixels estimate the standard deviation to 0.3 %; the ADU rounding adds 1e-5 in relative variance.
    assert image.std() == pytest.approx(1 / math.sqrt(photons), rel=0.02)


def test_raw_count_variance_matches_shot_and_read_noise():
    photons, read, gain, offset = 2e4, 10.0, 0.5, 100.0
    params = _blank(
        photons_per_pixel=photons, read_noise_e=read, camera_gain_adu_per_e=gain, camera_offset_adu=offset, output="raw"
    )
    raw = simulate(params, 4).image
    assert raw.mean() == pytest.approx(offset + gain * photons, rel=1e-3)
    expected_variance = gain**2 * (photons + read**2) + 1 / 12  # shot + read noise + ADC rounding
    assert raw.var() == pytest.approx(expected_variance, rel=0.03)
    assert np.array_equal(raw, np.rint(raw))


def test_background_terms_show_up_with_their_strength():
    photons = 1e9  # shot noise 3e-5, far below the terms measured here
    speckle = simulate(_blank(photons_per_pixel=photons, speckle_strength=0.01), 5).image
    assert speckle.std() == pytest.approx(0.01, rel=0.1)  # a band-limited field: fewer independent samples
    columns = simulate(_blank(photons_per_pixel=photons, column_noise=0.01), 5).image
    assert columns.std(axis=0).max() < 1e-3  # constant along each column
    assert columns.mean(axis=0).std() == pytest.approx(0.01, rel=0.15)
    raw = simulate(_blank(photons_per_pixel=photons, beam_waist_nm=15000.0, output="raw"), 5).image
    contrast = simulate(_blank(photons_per_pixel=photons, beam_waist_nm=15000.0), 5).image
    assert raw.max() > 2 * raw.min()  # the envelope is in the raw counts ...
    assert np.abs(contrast).max() < 1e-3  # ... and divided out of the contrast


# --- masks ----------------------------------------------------------------------------------------------------


def _count_blobs(mask: np.ndarray) -> int:
    """Number of 8-connected foreground components."""
    seen = np.zeros(mask.shape, dtype=bool)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                    if inside and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_masks_sit_at_the_particles_with_their_size_class():
    params = SimulationParameters(particles_per_image=(40, 40))
    result = simulate(params, 11)
    particles = result.particles
    assert result.mask.dtype == np.uint8 and result.mask.shape == (256, 256)
    assert len(particles) == 40
    labels_at_particles = result.mask[np.rint(particles["y_px"]).astype(int), np.rint(particles["x_px"]).astype(int)]
    np.testing.assert_array_equal(labels_at_particles, particles["label"])
    # Labels follow the size bins (midpoints between the class means: 190 and 450 nm).
    expected = 1 + (particles["diameter_nm"] >= 190).astype(int) + (particles["diameter_nm"] >= 450).astype(int)
    np.testing.assert_array_equal(particles["label"], expected)
    assert set(np.unique(result.mask)) <= {0, 1, 2, 3}
    assert _count_blobs(result.mask) == len(particles)  # default min distance keeps blobs apart


def test_particle_table_fields():
    particles = simulate(SimulationParameters(), 2).particles
    assert particles.dtype.names == ("x_px", "y_px", "z_nm", "diameter_nm", "material", "label", "contrast")
    assert np.all((particles["z_nm"] >= 0) & (particles["z_nm"] <= 400))
    assert set(particles["material"]) <= {"virus", "polystyrene"}
    assert np.all(particles["contrast"] > 0)


# --- determinism, focal stacks --------------------------------------------------------------------------------


def test_same_seed_same_image_other_seed_other_image():
    params = SimulationParameters(image_size=(64, 96))
    a, b, c = simulate(params, 5), simulate(params, 5), simulate(params, 6)
    assert a.image.dtype == np.float32 and a.image.shape == (64, 96)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.particles, b.particles)
    assert not np.array_equal(a.image, c.image)
    generator_result = simulate(params, np.random.default_rng(5))
    np.testing.assert_array_equal(generator_result.image, a.image)


def test_focal_stack_has_one_differing_plane_per_focus():
    planes = (-200.0, 0.0, 200.0)
    params = SimulationParameters(image_size=(64, 64), focal_planes_nm=planes, particles_per_image=(5, 5))
    result = simulate(params, 8)
    assert result.image.shape == (3, 64, 64) and result.image.dtype == np.float32
    assert result.mask.shape == (64, 64)
    for i in range(len(planes)):
        for j in range(i):
            assert np.abs(result.image[i] - result.image[j]).max() > 0.05


# --- parameters -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image_size", (0, 64)),
        ("image_size", (100_000, 100_000)),  # would need tens of GB
        ("pixel_size_nm", -5.0),
        ("pixel_size_nm", 300.0),  # coarser than Nyquist
        ("wavelength_nm", float("nan")),
        ("numerical_aperture", 1.6),  # above n_immersion
        ("n_immersion", 1.33),  # no reference reflection
        ("particle_classes", ()),
        ("size_bins_nm", (300.0, 200.0)),
        ("particles_per_image", (10, 5)),
        ("z_range_nm", (-10.0, 100.0)),
        ("focal_planes_nm", ()),
        ("min_distance_px", -1.0),
        ("mask_radius_px", 0.5),
        ("photons_per_pixel", 0.0),
        ("read_noise_e", -1.0),
        ("column_noise", 0.9),
        ("speckle_strength", -0.1),
        ("beam_waist_nm", 0.0),
        ("reference_phase_rad", math.inf),
        ("contrast_saturation", 0.0),
        ("output", "png"),
    ],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SimulationParameters(**{field: value})


def test_invalid_particle_class_and_gold_wavelength():
    with pytest.raises(ValueError, match="material"):
        ParticleClass("x", "unobtainium", 50.0, 5.0)
    with pytest.raises(ValueError, match="diameter_mean_nm"):
        ParticleClass("x", "gold", -50.0, 5.0)
    with pytest.raises(ValueError, match="gold"):
        SimulationParameters(wavelength_nm=1000.0, particle_classes=(ParticleClass("au", "gold", 20.0, 2.0),))


def test_dict_round_trip_through_json():
    params = SimulationParameters(
        image_size=(128, 64),
        focal_planes_nm=(0.0, 150.0),
        particle_classes=(ParticleClass("au", "gold", 20.0, 2.0, 1.0), ParticleClass("ps", "polystyrene", 100, 5)),
        mask_radius_px=3.0,
        output="raw",
    )
    restored = SimulationParameters.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params
    with pytest.raises(ValueError, match="colour"):
        SimulationParameters.from_dict({"colour": "blue"})


def test_defaults_derived_from_optics():
    params = SimulationParameters()
    assert params.bins_nm == (190.0, 450.0)
    assert params.num_labels == 3
    # Half the Airy radius 0.61 lambda / min(NA, n_medium), in pixels.
    assert params.mask_radius == pytest.approx(0.5 * 0.61 * 520 / 1.33 / 60, rel=1e-3)
    assert params.min_distance == pytest.approx(2 * params.mask_radius + 2)


def test_command_line_flags_build_parameters(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    config = tmp_path / "sim.json"
    config.write_text(json.dumps({"wavelength_nm": 445.0, "photons_per_pixel": 5e4}))
    args = parser.parse_args(
        [
            *("--config", str(config), "--size", "128", "96", "--pixel-size-nm", "50", "--na", "1.3"),
            *("--particles", "3", "9", "--z-range-nm", "10", "200", "--planes-nm", "0", "100"),
            *("--photons-per-pixel", "1e6", "--read-noise-e", "1.5", "--output", "raw", "--mask-radius-px", "2.5"),
            *("--particle-class", "small", "protein", "20", "2", "1"),
            *("--particle-class", "big", "polystyrene", "200", "10", "0.5"),
        ]
    )
    params = parameters_from_cli(args)
    assert params.image_size == (128, 96)
    assert params.pixel_size_nm == 50.0 and params.numerical_aperture == 1.3
    assert params.wavelength_nm == 445.0  # from the config file
    assert params.photons_per_pixel == 1e6  # the flag overrides the config file
    assert params.particles_per_image == (3, 9) and params.z_range_nm == (10.0, 200.0)
    assert params.focal_planes_nm == (0.0, 100.0) and params.output == "raw"
    assert params.mask_radius_px == 2.5 and params.read_noise_e == 1.5
    assert [c.name for c in params.particle_classes] == ["small", "big"]
    assert parameters_from_cli(parser.parse_args([])) == SimulationParameters()
    with pytest.raises(ValueError, match="numbers"):
        parameters_from_cli(parser.parse_args(["--particle-class", "a", "gold", "big", "1", "1"]))


def test_simulator_imports_numpy_only():
    code = "import sys, napari_iscat_diffusion.iscat.simulate; print(' '.join(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not {"torch", "napari", "qtpy", "PyQt6", "PyQt5"} & {m.split(".")[0] for m in modules}
