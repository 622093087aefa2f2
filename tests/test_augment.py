"""Augmentation: geometric transforms move image and labels together, gain and noise touch the image only."""

import pytest
import torch
import torch.nn.functional as F
from training.augment import AugmentConfig, _rotate, augment

OFF = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "rotate": 0.0, "gain": 0.0, "noise": 0.0}


def _pattern(height=24, width=24):
    """An L (class 1 upright bar, class 2 foot) away from the borders; image = 10 inside + a smooth ramp in [0, 1)."""
    labels = torch.zeros(height, width, dtype=torch.int64)
    labels[4:18, 5:10] = 1
    labels[13:18, 10:19] = 2
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ramp = (0.6 * y / height + 0.39 * x / width).float()
    foreground = 10.0 * (labels > 0).float() + ramp
    return torch.stack([foreground, -foreground]), labels


def _only(**options):
    return AugmentConfig(**{**OFF, **options})


def _run(config, seed, image=None, labels=None):
    if image is None:
        image, labels = _pattern()
    return augment(image, labels, config, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"hflip": 1.0}, lambda m: [m.flip(-1)]),
        ({"vflip": 1.0}, lambda m: [m.flip(-2)]),
        ({"rot90": 1.0}, lambda m: [torch.rot90(m, k, (-2, -1)) for k in (1, 2, 3)]),
    ],
)
def test_exact_transforms_move_image_and_labels_together(options, expected):
    _, original = _pattern()
    seen = set()
    for seed in range(12):
        image, labels = _run(_only(**options), seed)
        candidates = expected(original)
        matches = [i for i, candidate in enumerate(candidates) if torch.equal(labels, candidate)]
        assert len(matches) == 1
        seen.add(matches[0])
        assert torch.equal(image[0] > 5, labels > 0)
        assert torch.equal(image[1], -image[0])
    assert seen == set(range(len(expected(original))))  # rot90 uses every multiple of 90 degrees


def test_rot90_keeps_the_shape_of_non_square_images():
    image, labels = _pattern(20, 28)
    for seed in range(6):
        out_image, out_labels = _run(_only(rot90=1.0), seed, image, labels)
        assert out_image.shape == image.shape
        assert torch.equal(out_labels, labels.flip(-1).flip(-2))


def _boundary(labels):
    inside = (labels > 0).float()[None, None]
    dilated = F.max_pool2d(inside, 3, stride=1, padding=1)[0, 0] > 0
    eroded = -F.max_pool2d(-inside, 3, stride=1, padding=1)[0, 0] > 0
    return dilated & ~eroded


@pytest.mark.parametrize("shape", [(24, 24), (22, 30)])
@pytest.mark.parametrize("degrees", [-25.0, -7.0, 4.0, 13.0, 30.0])
def test_small_rotations_keep_image_and_labels_aligned(shape, degrees):
    image, original = _pattern(*shape)
    rotated, labels = _rotate(image, original, degrees)
    assert rotated.shape == image.shape and labels.dtype == torch.int64
    assert not torch.equal(labels, original)
    assert set(labels.unique().tolist()) <= {0, 1, 2}  # nearest sampling never invents a label
    mismatch = (rotated[0] > 5) != (labels > 0)
    assert not (mismatch & ~_boundary(labels)).any()
    assert mismatch.sum() < 0.25 * _boundary(labels).sum()
    # Both classes keep about their area: no shear from a non-square aspect ratio.
    for label in (1, 2):
        area = int((original == label).sum())
        assert abs(int((labels == label).sum()) - area) <= 0.15 * area


def test_augment_draws_small_rotations_within_the_range():
    _, original = _pattern()
    changed = 0
    for seed in range(8):
        rotated, labels = _run(_only(rotate=1.0, max_degrees=30.0), seed)
        changed += not torch.equal(labels, original)
        assert not (((rotated[0] > 5) != (labels > 0)) & ~_boundary(labels)).any()
    assert changed >= 6
    for seed in range(4):
        assert torch.equal(_run(_only(rotate=1.0, max_degrees=0.0), seed)[1], original)


def test_small_rotation_turns_counterclockwise_as_displayed():
    image = torch.zeros(1, 9, 15)
    image[0, 4, 10] = 1.0  # three pixels right of the centre (4, 7)
    rotated, moved = _rotate(image, (image[0] > 0).long(), 90.0)
    assert moved.nonzero().tolist() == [[1, 7]]  # now three pixels above it
    assert (rotated[0] > 0.5).nonzero().tolist() == [[1, 7]]


def test_gain_and_noise_change_the_image_only():
    image, labels = _pattern()
    for seed in range(5):
        gained, gain_labels = _run(_only(gain=1.0, gain_range=(0.5, 2.0)), seed)
        factor = gained[0, 5, 6] / image[0, 5, 6]
        assert 0.5 <= factor <= 2.0 and factor != 1
        torch.testing.assert_close(gained, image * factor)
        assert torch.equal(gain_labels, labels)
        noisy, noise_labels = _run(_only(noise=1.0, noise_std_range=(0.1, 0.2)), seed)
        assert torch.equal(noise_labels, labels)
        assert 0.08 < float((noisy - image).std()) < 0.22


def test_deterministic_given_the_generator_and_varies_with_it():
    config = AugmentConfig(hflip=0.5, vflip=0.5, rot90=0.5, rotate=0.5, gain=0.5, noise=0.5)
    first = [_run(config, seed) for seed in range(6)]
    again = [_run(config, seed) for seed in range(6)]
    for (a_image, a_labels), (b_image, b_labels) in zip(first, again, strict=True):
        assert torch.equal(a_image, b_image) and torch.equal(a_labels, b_labels)
    assert len({tuple(image.flatten()[:50].tolist()) for image, _ in first}) > 1


def test_nothing_enabled_is_the_identity():
    image, labels = _pattern()
    out_image, out_labels = _run(_only(), 3)
    assert torch.equal(out_image, image) and torch.equal(out_labels, labels)


@pytest.mark.parametrize(
    "options",
    [
        {"hflip": 1.5},
        {"noise": -0.1},
        {"max_degrees": 200.0},
        {"gain_range": (0.0, 1.0)},
        {"noise_std_range": (0.2, 0.1)},
    ],
)
def test_bad_config_is_refused(options):
    with pytest.raises(ValueError, match="AugmentConfig"):
        AugmentConfig(**options)


def test_mismatched_shapes_are_refused():
    image, labels = _pattern()
    with pytest.raises(ValueError, match="augment"):
        augment(image, labels[:-1], AugmentConfig(), torch.Generator())
