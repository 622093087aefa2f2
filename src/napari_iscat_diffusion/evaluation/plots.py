"""Figures of metric curves (matplotlib): a grid of panels, one per metric, one coloured line per series, with
dashed target lines and a legend.

``metric_curves`` gives, for each sampler, the metrics at several step counts, and for one sampler the metrics at
several guidance scales; ``write_curve_figures`` draws each as one figure (``write_curves`` calls it; it also
redraws a saved ``curves.json``). matplotlib is an extra (``pip install napari-iscat-diffusion[plots]``); the
plugin itself draws no figures.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..io.atomic import atomic_write_bytes

PANEL_INCHES = (4.2, 2.6)  # 420 x 260 pixels at the saved 100 dpi
LEGEND_INCHES = 0.4
DPI = 100
MAX_VALUE_TICKS = 8  # more x values than this get matplotlib's ticks instead of one per value
MAX_DOTS = 60  # longer series are drawn as thin lines only


@dataclass(frozen=True)
class Panel:
    """One metric's panel: its key in the curve points, a title, the y range (None: the data's; values outside a
    given range are drawn at its edge and the title says so), dashed reference lines (targets, chance) and whether
    the y axis is logarithmic (non-positive values are then left out)."""

    metric: str
    title: str
    y_range: tuple[float, float] | None = None
    references: tuple[float, ...] = ()
    log_y: bool = False


def metric_panel(metric: str) -> Panel:
    """The panel of a metric of ``metric_curves`` (title, range, targets of issue 6); an unknown key gets its name."""
    if metric.startswith("f1_class_"):
        return Panel(metric, f"mask-fidelity F1, class {metric.rsplit('_', 1)[1]}", (0.0, 1.02), (0.95,))
    if metric.startswith("contrast_w_rel_class_"):
        return Panel(metric, f"contrast W / spread, class {metric.rsplit('_', 1)[1]} (target 0.1)", None, (0.1,))
    known = {
        "f1_all": Panel(metric, "mask-fidelity F1, all classes", (0.0, 1.02), (0.95,)),
        "c2st_accuracy": Panel(metric, "two-sample accuracy (chance 0.5, target 0.65)", (0.4, 1.02), (0.5, 0.65)),
        "noise_ratio": Panel(metric, "background noise / physics", (0.4, 1.6), (1.0,)),
        "spectrum_distance_decades": Panel(metric, "power spectrum distance (decades)", None, ()),
    }
    return known.get(metric, Panel(metric, metric))


def curves_figure(
    series: Mapping[str, Sequence[Mapping[str, float | None]]],
    axis: str,
    panels: Sequence[Panel],
    *,
    log_x: bool = False,
    columns: int = 2,
) -> Figure:
    """A figure of ``panels`` in ``columns``: for each panel, one line per entry of ``series`` (a name and its
    points, each a mapping with ``axis`` and the panel's metric; None values are skipped) against ``axis`` (log
    scale with ``log_x``), and a legend of the series' names below. Series i is drawn in matplotlib's colour Ci."""
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    size = (PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows + LEGEND_INCHES)
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    xs = sorted({float(p[axis]) for points in series.values() for p in points})
    for ax in axes[len(panels) :]:
        figure.delaxes(ax)
    for ax, panel in zip(axes[: len(panels)], panels, strict=True):
        _draw_panel(ax, series, axis, panel, xs, log_x=log_x and bool(xs) and xs[0] > 0)
    handles = [Line2D([], [], color=f"C{i}", linewidth=2) for i in range(len(series))]
    figure.legend(handles, list(series), loc="outside lower center", ncols=max(len(series), 1), frameon=False)
    return figure


def write_curve_figures(curves: Mapping, out_dir: str | os.PathLike) -> list[Path]:
    """Draw the curves of ``metric_curves`` (or its saved ``curves.json``) as ``steps.png`` (every metric against
    steps, a line per sampler) and ``guidance.png`` (against the guidance scale) in ``out_dir``; returns the paths."""
    guidance = curves["guidance"]
    figures = {
        "steps": (curves["steps"], "steps", True),
        "guidance": ({guidance["sampler"]: guidance["points"]}, "guidance", False),
    }
    written = []
    for name, (series, axis, log_x) in figures.items():
        first = next(iter(series.values()))[0]
        panels = [metric_panel(key) for key in first if key != axis]
        path = Path(out_dir) / f"{name}.png"
        save_figure(curves_figure(series, axis, panels, log_x=log_x), path)
        written.append(path)
    return written


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Save a figure as PNG under a temporary name, then rename it into place (no half-written file)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())


def _draw_panel(ax, series, axis: str, panel: Panel, xs: list[float], *, log_x: bool) -> None:
    clipped = False
    for i, points in enumerate(series.values()):
        xy = [(float(p[axis]), v) for p in points if (v := _value(p, panel.metric, panel.log_y)) is not None]
        if not xy:
            continue
        x, y = np.array(xy).T
        if panel.y_range is not None:
            clipped |= bool(np.any((y < panel.y_range[0]) | (y > panel.y_range[1])))
            y = np.clip(y, *panel.y_range)
        dots = len(x) <= MAX_DOTS
        ax.plot(x, y, color=f"C{i}", linewidth=2 if dots else 1, marker="o" if dots else None, markersize=4)
    for ref in panel.references:
        ax.axhline(ref, color="0.6", linestyle="--", linewidth=1)
    if panel.log_y:
        ax.set_yscale("log")
    if panel.y_range is not None:
        ax.set_ylim(*panel.y_range)
    if log_x:
        ax.set_xscale("log")
    # Every x value is a tick while they are few (step counts, guidance scales).
    if xs and len(xs) <= MAX_VALUE_TICKS:
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_xticks([], minor=True)
    ax.set_title(panel.title + (" (clipped)" if clipped else ""), fontsize="medium", loc="left")
    ax.set_xlabel(axis)


def _value(point: Mapping[str, float | None], metric: str, log_y: bool) -> float | None:
    """The point's value of ``metric``, or None where it is missing, not finite or not positive on a log axis."""
    value = point.get(metric)
    if value is None or not math.isfinite(value) or (log_y and value <= 0):
        return None
    return float(value)
