"""Mask validation and the condition tensor."""

import numpy as np
import pytest
import torch

from napari_iscat_diffusion.diffusion.conditioning import class_zone, encode_condition, null_condition, validate_mask
from napari_iscat_diffusion.diffusion.device import available_devices, resolve_device


def test_encode_condition_one_hot_plus_given_channel():
    labels = torch.tensor([[[0, 1], [2, 3]]])
    cond = encode_condition(labels, num_classes=3)
    assert cond.shape == (1, 4, 2, 2)
    expected_classes = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [1, 0]], [[0, 0], [0, 1]]], dtype=torch.float32)
    torch.testing.assert_close(cond[0, :3], expected_classes)
    torch.testing.assert_close(cond[0, 3], torch.ones(2, 2))


def test_null_condition_differs_from_an_empty_mask():
    empty = encode_condition(torch.zeros(2, 4, 4, dtype=torch.long), num_classes=2)
    null = null_condition(empty)
    assert null.shape == empty.shape
    assert not torch.equal(null, empty)
    assert float(null.abs().sum()) == 0.0
    assert float(empty[:, -1].min()) == 1.0


def test_validate_mask_accepts_2d_3d_bool_and_integral_floats():
    assert validate_mask(np.zeros((5, 7), np.uint8), 3).shape == (1, 5, 7)
    assert validate_mask(np.zeros((2, 5, 7), np.int32), 3).shape == (2, 5, 7)
    assert validate_mask(np.ones((5, 7), bool), 1).max() == 1
    out = validate_mask(np.array([[0.0, 2.0], [1.0, 0.0]]), 2)
    assert out.dtype == np.int64 and out.tolist() == [[[0, 2], [1, 0]]]


@pytest.mark.parametrize(
    ("mask", "phrase"),
    [
        (np.zeros((4, 4, 4, 4), np.uint8), "4 dimensions"),
        (np.zeros((5,), np.uint8), "1 dimensions"),
        (np.zeros((32, 32, 3), np.uint8), "RGB"),
        (np.zeros((0, 8), np.uint8), "empty"),
        (np.array([[0.5, 1.0]]), "non-integer values"),
        (np.array([[np.nan, 1.0]]), "NaN"),
        (np.array([[-1, 0]]), "negative labels"),
        (np.array([[0, 4]]), "contains label 4 but the model knows 3"),
        (np.array([["a", "b"]]), "not a label image"),
    ],
)
def test_validate_mask_errors_name_the_problem_and_the_source(mask, phrase):
    with pytest.raises(ValueError, match=phrase) as info:
        validate_mask(mask, 3, name="layer 'cells'")
    assert "layer 'cells'" in str(info.value)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    assert available_devices()[:2] == ["auto", "cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available on this machine"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu7")


def test_a_class_zone_covers_the_reach_around_the_named_classes_and_ramps_to_zero():
    labels = np.zeros((2, 30, 30), np.int64)
    labels[0, 10, 5] = 1
    labels[0, 10, 20] = 2
    labels[1, 10, 5] = 1
    zone = class_zone(labels, [2, 3], reach_px=3.0)
    assert zone.shape == (2, 30, 30)
    row = zone[0, 10]
    assert row[20] == 1.0 and row[23] == 1.0 and row[17] == 1.0
    assert row[24] == pytest.approx(2 / 3) and row[26] == 0.0 and row[5] == 0.0
    assert not zone[1].any()  # no particle of classes 2 or 3 in the second mask
    both = class_zone(labels, [1, 2], reach_px=3.0)
    assert both[0, 10, 5] == 1.0 and both[0, 10, 20] == 1.0 and both[1, 10, 5] == 1.0
    with pytest.raises(ValueError, match="reach_px must be > 0"):
        class_zone(labels, [1], reach_px=0)
