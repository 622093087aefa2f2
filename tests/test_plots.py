"""The labelled curve figures: round ticks, and lines drawn where their values lie."""

import numpy as np
import pytest
from PIL import Image

from napari_iscat_diffusion.evaluation.plots import (
    BOTTOM,
    COLOURS,
    LEFT,
    LEGEND_H,
    PANEL_H,
    PANEL_W,
    RIGHT,
    TOP,
    Panel,
    curves_figure,
    metric_panel,
    nice_ticks,
    save_figure,
)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1.0), (0.4, 1.6), (-3.0, 250.0), (0.95, 0.97), (1e-12, 3e-12)])
def test_ticks_are_round_evenly_spaced_and_inside_the_range(low, high):
    ticks = nice_ticks(low, high)
    assert 3 <= len(ticks) <= 7
    assert low - 1e-12 <= ticks[0] and ticks[-1] <= high + 1e-12
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]) + 1e-9)
    assert any(np.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_each_series_is_drawn_in_its_colour_through_its_points():
    series = {"a": [{"x": 1, "m": 0.0}, {"x": 3, "m": 1.0}], "b": [{"x": 1, "m": 0.5}, {"x": 3, "m": None}]}
    image = np.asarray(curves_figure(series, "x", [Panel("m", "metric", (0.0, 1.0))], columns=1))
    assert image.shape == (PANEL_H + LEGEND_H, PANEL_W, 3)
    x0, x1, y0, y1 = LEFT, PANEL_W - RIGHT, TOP, PANEL_H - BOTTOM

    def colour_near(x, y):
        patch = image[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3)
        return {tuple(int(c) for c in pixel) for pixel in patch}

    # Series a runs from (1, 0) at the bottom left to (3, 1) at the top right of the frame, through the middle.
    for x, y in ((x0, y1), (x1, y0), ((x0 + x1) / 2, (y0 + y1) / 2)):
        assert COLOURS[0] in colour_near(x, y)
    # Series b has one finite point, at 0.5 on the left edge: a dot, no line.
    assert COLOURS[1] in colour_near(x0, (y0 + y1) / 2)
    assert COLOURS[1] not in colour_near((x0 + x1) / 2, (y0 + y1) / 2)


def test_values_outside_a_given_range_are_drawn_at_its_edge():
    series = {"a": [{"x": 1, "m": 5.0}, {"x": 2, "m": 5.0}]}
    image = np.asarray(curves_figure(series, "x", [Panel("m", "metric", (0.0, 1.0))], columns=1))
    row = image[TOP, LEFT + 10 : PANEL_W - RIGHT - 10]
    assert (row == COLOURS[0]).all(axis=1).any()


def test_panels_of_the_curve_metrics_and_the_saved_file(tmp_path):
    assert metric_panel("f1_class_2").title == "mask-fidelity F1, class 2"
    assert metric_panel("c2st_accuracy").references == (0.5, 0.65)
    assert metric_panel("something_new") == Panel("something_new", "something_new")
    series = {"s": [{"steps": 5, "f1_all": 0.5, "noise_ratio": 0.9}, {"steps": 50, "f1_all": 0.9, "noise_ratio": 1.0}]}
    panels = [metric_panel("f1_all"), metric_panel("noise_ratio"), metric_panel("spectrum_distance_decades")]
    path = tmp_path / "figure.png"
    save_figure(curves_figure(series, "steps", panels, log_x=True), path)
    with Image.open(path) as image:
        assert image.size == (2 * PANEL_W, 2 * PANEL_H + LEGEND_H)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_log_panel_puts_the_geometric_mean_halfway_and_leaves_out_non_positive_values():
    series = {"a": [{"x": 1, "m": 10.0}, {"x": 2, "m": 100.0}, {"x": 3, "m": 1000.0}, {"x": 4, "m": 0.0}]}
    image = np.asarray(curves_figure(series, "x", [Panel("m", "metric", log_y=True)], columns=1))
    x0, x1, y0, y1 = LEFT, PANEL_W - RIGHT, TOP, PANEL_H - BOTTOM
    # x runs 1..4: the point at 100 (x = 2) lies a third of the way across, halfway up.
    x, y = x0 + (x1 - x0) / 3, (y0 + y1) / 2
    patch = image[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3)
    assert (patch == COLOURS[0]).all(axis=1).any()
    # Nothing is drawn for the zero at x = 4 (the right edge).
    column = image[y0 + 1 : y1, x1 - 3 : x1]
    assert not (column == COLOURS[0]).all(axis=2).any()
