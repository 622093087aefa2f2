"""The curve figures: each series drawn through its points in its colour, values outside a given range at its edge,
targets as dashed lines, and the saved file."""

import numpy as np
from matplotlib.colors import same_color
from PIL import Image

from napari_iscat_diffusion.evaluation.plots import (
    DPI,
    LEGEND_INCHES,
    PANEL_INCHES,
    Panel,
    curves_figure,
    metric_panel,
    save_figure,
)


def _data(line):
    return [list(map(float, values)) for values in line.get_data()]


def test_each_series_is_drawn_in_its_colour_through_its_points():
    series = {"a": [{"x": 1, "m": 0.0}, {"x": 3, "m": 1.0}], "b": [{"x": 1, "m": 0.5}, {"x": 3, "m": None}]}
    figure = curves_figure(series, "x", [Panel("m", "metric", (0.0, 1.0), (0.95,))], columns=1)
    (ax,) = figure.axes
    a, b, target = ax.lines
    assert _data(a) == [[1.0, 3.0], [0.0, 1.0]] and same_color(a.get_color(), "C0")
    assert _data(b) == [[1.0], [0.5]] and same_color(b.get_color(), "C1")  # None is skipped: a dot, no line
    assert target.get_linestyle() == "--" and list(target.get_ydata()) == [0.95, 0.95]
    assert ax.get_ylim() == (0.0, 1.0) and [t.get_text() for t in ax.get_xticklabels()] == ["1", "3"]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["a", "b"]


def test_values_outside_a_given_range_are_drawn_at_its_edge_and_the_title_says_so():
    series = {"a": [{"x": 1, "m": 5.0}, {"x": 2, "m": 0.5}]}
    (ax,) = curves_figure(series, "x", [Panel("m", "metric", (0.0, 1.0))], columns=1).axes
    assert _data(ax.lines[0])[1] == [1.0, 0.5] and ax.get_title(loc="left") == "metric (clipped)"
    (ax,) = curves_figure({"a": series["a"][1:]}, "x", [Panel("m", "metric", (0.0, 1.0))], columns=1).axes
    assert ax.get_title(loc="left") == "metric"


def test_a_log_panel_leaves_out_non_positive_values():
    series = {"a": [{"x": 1, "m": 10.0}, {"x": 2, "m": 100.0}, {"x": 3, "m": 1000.0}, {"x": 4, "m": 0.0}]}
    (ax,) = curves_figure(series, "x", [Panel("m", "metric", log_y=True)], log_x=True, columns=1).axes
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    assert _data(ax.lines[0]) == [[1.0, 2.0, 3.0], [10.0, 100.0, 1000.0]]


def test_panels_of_the_curve_metrics_and_the_saved_file(tmp_path):
    assert metric_panel("f1_class_2").title == "mask-fidelity F1, class 2"
    assert metric_panel("c2st_accuracy").references == (0.5, 0.65)
    assert metric_panel("something_new") == Panel("something_new", "something_new")
    series = {"s": [{"steps": 5, "f1_all": 0.5, "noise_ratio": 0.9}, {"steps": 50, "f1_all": 0.9, "noise_ratio": 1.0}]}
    panels = [metric_panel("f1_all"), metric_panel("noise_ratio"), metric_panel("spectrum_distance_decades")]
    figure = curves_figure(series, "steps", panels, log_x=True)
    assert len(figure.axes) == 3  # the fourth cell of the 2 x 2 grid stays empty
    path = tmp_path / "figure.png"
    save_figure(figure, path)
    with Image.open(path) as image:
        width, height = 2 * PANEL_INCHES[0] * DPI, (2 * PANEL_INCHES[1] + LEGEND_INCHES) * DPI
        assert image.size == (round(width), round(height))
        assert np.asarray(image.convert("L")).min() < 100  # something was drawn
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
