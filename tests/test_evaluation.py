"""Evaluation suite: detector, matching, physics statistics, C2ST, diversity and mask edits."""

import numpy as np
import pytest

from napari_iscat_diffusion.evaluation import (
    DetectorSettings,
    classifier_two_sample_test,
    detect_particles,
    edit_mask,
    edit_scores,
    fidelity_scores,
    mask_particles,
    match_image,
    match_points,
    repeated_two_sample_test,
    sample_diversity,
    simulated_set,
)
from napari_iscat_diffusion.evaluation.c2st import _best_threshold, seed_spread
from napari_iscat_diffusion.evaluation.evaluate import compare_image_sets, detector_settings
from napari_iscat_diffusion.evaluation.statistics import (
    SURROUNDING_BANDS,
    background_noise,
    distribution_distance,
    largest_spectrum_ratio,
    line_pattern,
    peak_contrasts,
    radial_power_spectrum,
    relative_distance_standard_error,
    spectrum_distance,
    surroundings,
)
from napari_iscat_diffusion.iscat.masks import draw_blobs
from napari_iscat_diffusion.iscat.particles import ParticleClass
from napari_iscat_diffusion.iscat.simulate import SimulationParameters, simulate

# The regime of the bundled default model's training data (training/configs/default_model.yaml).
DEFAULT_MODEL_DATA = SimulationParameters(image_size=(96, 96), particles_per_image=(2, 12))


def test_detector_on_simulated_images():
    """Measured on 20 images; seed 1000.. gives precision 0.89, recall 0.26 / 0.94 / 0.96 for 80 / 300 / 600 nm
    (80 nm particles, contrast ~0.02, are often hidden by their random phase and the speckle)."""
    params = DEFAULT_MODEL_DATA
    settings = detector_settings(params)
    per_image = []
    for seed in range(1000, 1020):
        result = simulate(params, seed)
        found = detect_particles(result.image, settings)
        true = np.stack([result.particles["y_px"], result.particles["x_px"]], axis=1)
        per_image.append(match_image(found.positions, true, result.particles["label"], settings.psf_radius_px))
    scores = fidelity_scores(per_image)
    assert scores["all"]["precision"] >= 0.8
    assert scores["per_class"]["2"]["recall"] >= 0.85
    assert scores["per_class"]["3"]["recall"] >= 0.85
    assert scores["per_class"]["1"]["recall"] >= 0.15


def test_detector_finds_bright_dark_and_ring_particles_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    yy, xx = np.indices((64, 64), dtype=np.float64)
    image = 2e-3 * rng.standard_normal((64, 64))
    spots = {(16, 16): 0.05, (16, 48): -0.05}
    for (y, x), amplitude in spots.items():
        image += amplitude * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.4**2))
    ring = np.hypot(yy - 46, xx - 30)
    image += -0.04 * np.exp(-(ring**2) / 2) + 0.03 * np.exp(-((ring - 3.5) ** 2) / 2)  # dark centre, bright ring
    found = detect_particles(image, DetectorSettings(psf_radius_px=4.0))
    _, true = match_points(found.positions, [(16, 16), (16, 48), (46, 30)], 2.0)
    assert sorted(true) == [0, 1, 2] and len(found.positions) == 3
    assert found.noise == pytest.approx(2e-3 * 0.25, rel=0.5)  # the band-pass keeps about a quarter of white noise
    assert len(detect_particles(2e-3 * rng.standard_normal((64, 64))).positions) == 0


def test_detector_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        detect_particles(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        detect_particles(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="threshold"):
        DetectorSettings(threshold=0)


def test_match_points_maximises_pairs_where_greedy_would_not():
    detected = [(0, 0), (0, 2)]
    true = [(0, 1.1), (0, 3)]  # greedy takes the closest pair (0, 2)-(0, 1.1) first and leaves (0, 0) alone
    det, tru = match_points(detected, true, 1.2)
    assert sorted(zip(det.tolist(), tru.tolist(), strict=True)) == [(0, 0), (1, 1)]
    det, tru = match_points(detected, true, 0.5)
    assert len(det) == 0
    assert len(match_points([], true, 1.0)[0]) == 0


def test_match_image_counts_per_class_and_charges_false_positives_to_the_nearest_blob():
    true = np.array([(10, 10), (10, 30), (40, 40)], float)
    labels = np.array([1, 2, 2])
    detected = np.array([(11, 10), (40, 42), (12, 33), (50, 50)], float)  # (12, 33) is 3.6 px from (10, 30)
    counts = match_image(detected, true, labels, tolerance_px=3.0)
    assert (counts[1].true_positives, counts[1].false_positives, counts[1].false_negatives) == (1, 0, 0)
    # (10, 30) missed; (12, 33) and (50, 50) are spurious, nearest blobs (10, 30) and (40, 40) are class 2
    assert (counts[2].true_positives, counts[2].false_positives, counts[2].false_negatives) == (1, 2, 1)
    scores = fidelity_scores([counts, match_image(np.array([(5.0, 5.0)]), np.zeros((0, 2)), np.zeros(0), 3.0)])
    assert scores["per_class"]["2"]["precision"] == pytest.approx(1 / 3)
    assert scores["per_class"]["2"]["recall"] == pytest.approx(1 / 2)
    assert scores["per_class"]["2"]["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert scores["per_class"]["0"]["false_positives"] == 1 and scores["per_class"]["0"]["recall"] is None
    assert scores["all"]["true_positives"] == 2 and scores["all"]["false_positives"] == 3


def test_match_image_leaves_the_border_strip_out_of_the_counts():
    true = np.array([(1, 30), (30, 30), (62, 10)], float)  # two blobs cut by the edge of a 64 x 64 image
    labels = np.array([1, 1, 2])
    # A hit inside, a spurious peak in the strip, one just inside it, and a detection outside the strip
    # that matches a blob in the strip (matched, so not spurious, and that blob is not counted).
    detected = np.array([(30, 31), (2, 50), (59, 50), (59, 10)], float)
    everything = match_image(detected, true, labels, tolerance_px=4.0)
    assert (everything[1].true_positives, everything[1].false_positives, everything[1].false_negatives) == (1, 2, 1)
    assert (everything[2].true_positives, everything[2].false_positives, everything[2].false_negatives) == (1, 0, 0)
    counts = match_image(detected, true, labels, tolerance_px=4.0, image_shape=(64, 64), border_px=4.0)
    assert set(counts) == {1}
    assert (counts[1].true_positives, counts[1].false_positives, counts[1].false_negatives) == (1, 1, 0)
    with pytest.raises(ValueError, match="image_shape"):
        match_image(detected, true, labels, 4.0, border_px=4.0)


def test_detector_merges_ring_fragments_within_the_merge_radius():
    settings = DetectorSettings.for_pixel_size(240.0, 60.0)
    assert settings.min_distance_px == pytest.approx(1.5 * 4.0)
    assert DetectorSettings.for_pixel_size(240.0, 60.0, min_distance_px=2.0).min_distance_px == 2.0


def test_mask_particles_keeps_touching_blobs_of_different_classes_apart():
    mask = draw_blobs((32, 32), np.array([(10.0, 10.0), (10.0, 13.0), (25.0, 20.0)]), np.array([1, 2, 1]), 2.0)
    blobs = mask_particles(mask)
    order = np.lexsort(blobs.positions.T[::-1])
    assert blobs.labels[order].tolist() == [1, 2, 1]
    # the overlap goes to the nearer centre, which trims the first blob on one side
    np.testing.assert_allclose(blobs.positions[order][[0, 2]], [(10, 10), (25, 20)], atol=0.25)
    assert blobs.radii[order][2] == pytest.approx(2.0, rel=0.15)
    with pytest.raises(ValueError, match="integer"):
        mask_particles(np.zeros((4, 4), np.float32))


def test_peak_contrast_and_background_noise_on_known_images():
    rng = np.random.default_rng(1)
    yy, xx = np.indices((96, 96), dtype=np.float64)
    image = 3e-3 * rng.standard_normal((96, 96))
    image -= 0.08 * np.exp(-((yy - 30) ** 2 + (xx - 40) ** 2) / (2 * 1.4**2))
    assert peak_contrasts(image, np.array([(30.0, 40.0)]), 4.0)[0] == pytest.approx(0.08, rel=0.1)
    assert background_noise(image, np.array([(30.0, 40.0)]), 4.0) == pytest.approx(3e-3, rel=0.1)


def test_surroundings_measure_each_class_s_rings_band_by_band():
    rng = np.random.default_rng(5)
    yy, xx = np.indices((96, 96), dtype=np.float64)
    centres, labels = np.array([(30.0, 30.0), (60.0, 70.0)]), np.array([2, 1])
    radius = np.hypot(yy - 30, xx - 30)
    rings = 0.02 * np.cos(2 * np.pi * radius / 8) * np.exp(-radius / 16)  # a bright particle's rings, class 2
    noise = 3e-3 * rng.standard_normal((2, 96, 96))
    with_rings = surroundings(noise + rings, [(centres, labels)] * 2, 4.0)
    weaker = surroundings(noise + 0.5 * rings, [(centres, labels)] * 2, 4.0)
    assert sorted(with_rings) == [1, 2] and len(with_rings[2]) == len(SURROUNDING_BANDS)
    # Class 1 has no rings: noise only, in every band.
    assert with_rings[1] == pytest.approx([3e-3] * len(SURROUNDING_BANDS), rel=0.25)
    ratio = np.array(weaker[2]) / np.array(with_rings[2])
    assert np.all(ratio[:3] < 0.75) and np.all(ratio < 0.95)
    assert weaker[1] == pytest.approx(with_rings[1], rel=0.05)  # class 1's surroundings are not class 2's rings
    assert surroundings(noise, [(centres[:0], labels[:0])] * 2, 4.0) == {}
    far = surroundings(noise[:1, :20, :20], [(np.array([(10.0, 10.0)]), np.array([1]))], 4.0)
    assert far[1][-1] is None  # no pixel of a 20 px image lies 24-40 px from its centre


def test_line_pattern_sees_column_offsets_and_their_direction():
    rng = np.random.default_rng(3)
    particle = np.array([(30.0, 40.0)])
    noise = 3e-3 * rng.standard_normal((96, 96))
    columns, rows = line_pattern(noise, particle, 4.0)
    assert columns == pytest.approx(rows, rel=0.3)
    assert columns == pytest.approx(3e-3 / np.sqrt(96), rel=0.3)  # means of ~90 pixels of white noise
    striped = noise + 1e-3 * rng.standard_normal((1, 96))
    columns, rows = line_pattern(striped, particle, 4.0)
    assert columns > 2.5 * rows
    assert line_pattern(striped.T, particle[:, ::-1], 4.0) == pytest.approx((rows, columns))


def test_power_spectrum_and_distance():
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((8, 64, 64))
    frequencies, power = radial_power_spectrum(noise)
    assert frequencies[0] > 0 and frequencies[-1] < 0.5
    assert np.std(power[1:]) / np.mean(power[1:]) < 0.1  # white noise: flat
    assert spectrum_distance(power, power) == 0
    assert spectrum_distance(radial_power_spectrum(10 * noise)[1], power) == pytest.approx(2.0)  # 100x power
    smooth = np.cumsum(noise, axis=2)  # red noise
    assert spectrum_distance(radial_power_spectrum(smooth)[1], power) > 0.5


def test_largest_spectrum_ratio_names_the_band_with_extra_power():
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((16, 64, 64))
    frequencies, power = radial_power_spectrum(noise)
    # 30 % more power in a ring around 0.2 cycles/px, nothing elsewhere changed.
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))
    ring = np.where(np.abs(radius - 0.2) < 0.02, np.sqrt(1.3), 1.0)
    boosted = np.real(np.fft.ifft2(np.fft.fft2(noise) * ring))
    index, ratio = largest_spectrum_ratio(radial_power_spectrum(boosted)[1], power)
    assert abs(frequencies[index] - 0.2) < 0.02 and ratio == pytest.approx(1.3, rel=0.1)
    # A deficit counts as much as an excess: half the power everywhere reads 0.5, not the bin nearest 1.
    assert largest_spectrum_ratio(power / 2, power)[1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        largest_spectrum_ratio(power[:-1], power)
    with pytest.raises(ValueError, match="no frequency bin"):
        largest_spectrum_ratio(np.zeros_like(power), power)


def test_distribution_distance_sees_a_scaled_contrast():
    rng = np.random.default_rng(3)
    reference = rng.lognormal(np.log(0.02), 0.3, 2000)
    same = distribution_distance(rng.lognormal(np.log(0.02), 0.3, 2000), reference)
    assert same["relative_to_spread"] < 0.1
    scaled = distribution_distance(1.3 * reference, reference)
    assert scaled["wasserstein"] == pytest.approx(0.3 * reference.mean(), rel=1e-6)
    assert scaled["relative_to_spread"] > 0.5
    assert scaled["range_ratio"] == pytest.approx(1.3) and 0.9 < same["range_ratio"] < 1.1
    median = np.median(reference)
    narrow = distribution_distance(median + 0.5 * (reference - median), reference)
    assert narrow["range_ratio"] == pytest.approx(0.5) and narrow["median"] == pytest.approx(median)
    # The percentiles show where the narrow sample parts from the reference: its tails, not its median.
    levels, drawn, physics = (np.array(narrow["percentiles"][key]) for key in ("levels", "values", "reference"))
    assert levels.tolist() == [5, 10, 25, 50, 75, 90, 95]
    assert physics == pytest.approx(np.percentile(reference, levels))
    assert drawn - median == pytest.approx(0.5 * (physics - median))
    empty = distribution_distance(np.zeros(0), reference)
    assert empty["wasserstein"] is None and empty["percentiles"] is None
    assert distribution_distance(reference, np.full(10, 0.02))["range_ratio"] is None


def _per_image_contrasts(n_images: int, seed: int, shared: float = 0.3, own: float = 0.3) -> list[np.ndarray]:
    """1-4 lognormal contrasts per image around 0.02: log-std ``shared`` for a factor all particles of an image
    share, ``own`` for each particle's."""
    rng = np.random.default_rng(seed)
    return [rng.lognormal(np.log(0.02) + rng.normal(0, shared), own, rng.integers(1, 5)) for _ in range(n_images)]


def test_distance_standard_error_matches_the_scatter_over_repeated_sets():
    """Measured on this model of the data: the distance scatters by 0.025 over 30 pairs of sets of 288
    images, the bootstrap says 0.034 (it errs on the wide side near 0); where an image's particles are
    alike, resampling particles instead of images would understate it."""
    repeated = [
        distribution_distance(
            np.concatenate(_per_image_contrasts(288, seed)),
            np.concatenate(_per_image_contrasts(288, 100 + seed)),
        )["relative_to_spread"]
        for seed in range(30)
    ]
    generated, reference = _per_image_contrasts(288, 1), _per_image_contrasts(288, 2)
    se = relative_distance_standard_error(generated, reference, resamples=300)
    assert 0.6 < se / np.std(repeated) < 1.6
    alike = [_per_image_contrasts(288, seed, shared=0.5, own=0.1) for seed in (3, 4)]
    as_images = relative_distance_standard_error(*alike, resamples=300)
    as_particles = relative_distance_standard_error(*[list(np.concatenate(a)[:, None]) for a in alike], resamples=300)
    assert as_particles < 0.8 * as_images
    assert relative_distance_standard_error(generated, reference, resamples=300) == se  # seeded
    assert relative_distance_standard_error([np.array([0.1])], reference) is None
    assert relative_distance_standard_error(generated, [np.full(3, 0.02)] * 4) is None


def test_simulator_against_itself_and_against_brighter_particles():
    """Measured: W / spread 0.11 against itself, 0.45 at 1.3x and 1.5 at 2x the contrast (24 images of 64x64)."""
    single = {
        "image_size": (64, 64),
        "particles_per_image": (2, 6),
        "particle_classes": (ParticleClass("virus", "virus", 80, 8, 1.0),),
        "size_bins_nm": (190.0, 450.0),
    }
    params = SimulationParameters(**single)
    reference = simulated_set(params, 24)
    same = compare_image_sets(simulated_set(params, 24, seed=7_000_000), reference, params, c2st=False)
    assert same["physics"]["peak_contrast"]["1"]["relative_to_spread"] < 0.25
    assert 0 < same["physics"]["peak_contrast"]["1"]["relative_to_spread_se"] < 0.25
    assert same["physics"]["power_spectrum"]["distance_decades"] < 0.05
    assert 0.9 < same["physics"]["background_noise"]["ratio"] < 1.1
    assert 0.85 < same["physics"]["line_pattern"]["columns"]["ratio"] < 1.15
    around = same["physics"]["surroundings"]
    assert around["bands_psf_radii"][0] == [1, 2]
    assert all(0.8 < r < 1.25 for r in around["per_class"]["1"]["ratio"])
    camera = SimulationParameters(**single, column_noise=1.5e-3)  # three times the default column gains' spread
    no_columns = SimulationParameters(**single, column_noise=0.0)
    plain = compare_image_sets(
        simulated_set(no_columns, 24, seed=7_000_000), simulated_set(camera, 24), camera, c2st=False
    )
    assert plain["physics"]["line_pattern"]["columns"]["ratio"] < 0.6  # the camera's column pattern is missing
    assert 0.85 < plain["physics"]["line_pattern"]["rows"]["ratio"] < 1.15
    brighter = SimulationParameters(**single, contrast_scale=1.3)
    different = compare_image_sets(simulated_set(brighter, 24, seed=7_000_000), reference, params, c2st=False)
    assert different["physics"]["peak_contrast"]["1"]["relative_to_spread"] > 0.3


def test_c2st_is_chance_on_one_distribution_and_sure_on_different_ones():
    params = SimulationParameters(image_size=(32, 32), particles_per_image=(1, 3))
    first = simulated_set(params, 48, seed=0).images
    second = simulated_set(params, 48, seed=1000).images
    same = classifier_two_sample_test(first, second, seed=0, steps=300)
    assert same.ci_low <= 0.5 <= same.ci_high and same.num_test == 48
    # The 95 % Wilson score interval of the held-out count (z = 1.96): centre and half-width in closed form.
    k, n, z = round(same.accuracy * 48), 48, 1.959964
    centre = (k / n + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(k / n * (1 - k / n) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (same.ci_low, same.ci_high) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert classifier_two_sample_test(first, second, seed=0, steps=300) == same  # deterministic for a seed
    different = classifier_two_sample_test(first, 2 * second, seed=0, steps=300)
    assert different.accuracy >= 0.85 and different.ci_low > 0.5
    with pytest.raises(ValueError, match="at least 4"):
        classifier_two_sample_test(first[:3], second)


def test_the_repeated_test_reports_the_first_seed_and_the_spread_over_all():
    params = SimulationParameters(image_size=(32, 32), particles_per_image=(1, 3))
    first = simulated_set(params, 16, seed=0).images
    second = 1.3 * simulated_set(params, 16, seed=1000).images
    repeated = repeated_two_sample_test(first, second, seed=5, repeats=3, steps=60)
    singles = [classifier_two_sample_test(first, second, seed=s, steps=60).accuracy for s in (5, 6, 7)]
    assert repeated["accuracy"] == singles[0] and repeated["num_test"] == 16
    spread = repeated["over_seeds"]
    assert spread["seeds"] == [5, 6, 7] and spread["accuracies"] == singles
    assert spread["min"] == min(singles) and spread["max"] == max(singles)
    assert spread["mean"] == pytest.approx(np.mean(singles)) and spread["std"] == pytest.approx(np.std(singles, ddof=1))
    assert "over_seeds" not in repeated_two_sample_test(first, second, seed=5, steps=60)
    with pytest.raises(ValueError, match="repeats must be at least 1"):
        repeated_two_sample_test(first, second, repeats=0)
    with pytest.raises(ValueError, match="at least 2 accuracies"):
        seed_spread([0.5])


def test_c2st_threshold_is_fitted_to_shifted_scores():
    # Scores of a network trained on crops can all lie on one side of 0 for whole images: the threshold
    # must follow them, not stay at 0.
    scores = np.array([3.0, 3.1, 3.4, 3.5, 3.6, 3.2])
    positive = np.array([False, False, True, True, True, False])
    assert _best_threshold(scores, positive) == pytest.approx(3.3)
    assert _best_threshold(scores[::-1].copy(), positive[::-1].copy()) == pytest.approx(3.3)
    assert np.all(scores > _best_threshold(scores, np.ones(6, bool)))
    assert not np.any(scores > _best_threshold(scores, np.zeros(6, bool)))
    overlapping = np.array([False, False, True, False, True, True])  # best: one mistake, above 2 or above 4
    threshold = _best_threshold(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), overlapping)
    assert np.sum((np.arange(1.0, 7.0) > threshold) == overlapping) == 5


def test_diversity():
    rng = np.random.default_rng(4)
    independent = rng.normal(0, 2.0, (3, 4, 32, 32))
    assert sample_diversity(independent, 2.0)["relative"] == pytest.approx(1.0, abs=0.05)
    collapsed = np.repeat(independent[:, :1], 4, axis=1)
    assert sample_diversity(collapsed, 2.0)["rms_distance"] == 0
    with pytest.raises(ValueError, match="S >= 2"):
        sample_diversity(independent[:, :1], 2.0)


def test_edit_mask_moves_and_adds_blobs():
    mask = draw_blobs((64, 64), np.array([(16.0, 16.0), (40.0, 44.0), (50.0, 12.0)]), np.array([1, 2, 3]), 2.0)
    edit = edit_mask(mask, np.random.default_rng(5), move=2, add=2, num_classes=3)
    assert len(edit.moved_to) == 2 and len(edit.added) == 2
    for (y, x), label in zip(edit.moved_to, edit.moved_labels, strict=True):
        assert edit.mask[round(y), round(x)] == label
    for y, x in edit.moved_from:
        assert edit.mask[round(y), round(x)] == 0
    for (y, x), label in zip(edit.added, edit.added_labels, strict=True):
        assert edit.mask[round(y), round(x)] == label
    assert len(mask_particles(edit.mask).labels) == 5
    assert np.all(np.hypot(*(edit.moved_to - edit.moved_from).T) >= 8)
    followed = edit_scores([np.concatenate([edit.moved_to, edit.added])], [edit], 2.0)
    assert followed["moved_recall"] == 1 and followed["added_recall"] == 1 and followed["ghost_rate"] == 0
    stayed = edit_scores([edit.moved_from], [edit], 2.0)
    assert stayed["moved_recall"] == 0 and stayed["ghost_rate"] == 1 and stayed["added_recall"] == 0
