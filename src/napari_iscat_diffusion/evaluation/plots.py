"""Labelled figures of metric curves (pillow): a grid of panels, one per metric, one coloured line per series, with
ticks, axis names, dashed target lines and a legend.

``metric_curves`` gives, for each sampler, the metrics at several step counts, and for one sampler the metrics at
several guidance scales; ``write_curve_figures`` draws each as one figure (``write_curves`` calls it; it also
redraws a saved ``curves.json``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io.atomic import atomic_write_bytes

PANEL_W, PANEL_H = 420, 260
LEFT, RIGHT, TOP, BOTTOM = 60, 30, 30, 46  # room for the tick labels
LEGEND_H = 26
COLOURS = ((0, 90, 200), (200, 30, 30), (0, 150, 70), (220, 120, 0), (150, 60, 170), (90, 170, 255), (0, 0, 0))
GRID_GREY, FRAME_GREY = (150, 150, 150), (120, 120, 120)
MAX_VALUE_TICKS = 8  # more x values than this get round ticks instead of one per value
MAX_DOTS = 60  # longer series are drawn as lines only


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


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) within [low, high]."""
    if not high > low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [(first + i) * step for i in range(int(high / step + 1e-9) - first + 1)]


def curves_figure(
    series: Mapping[str, Sequence[Mapping[str, float | None]]],
    axis: str,
    panels: Sequence[Panel],
    *,
    log_x: bool = False,
    columns: int = 2,
) -> Image.Image:
    """An RGB figure of ``panels`` in ``columns``: for each panel, one line per entry of ``series`` (a name and its
    points, each a mapping with ``axis`` and the panel's metric; None values are skipped) against ``axis`` (log
    scale with ``log_x``), and a legend of the series' names below."""
    rows = math.ceil(len(panels) / columns)
    width = PANEL_W * min(columns, len(panels))
    image = Image.new("RGB", (width, PANEL_H * rows + LEGEND_H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    xs = sorted({float(p[axis]) for points in series.values() for p in points})
    colours = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(series)}
    for i, panel in enumerate(panels):
        origin = ((i % columns) * PANEL_W, (i // columns) * PANEL_H)
        _draw_panel(draw, font, origin, series, axis, panel, xs, log_x, colours)
    x = LEFT
    for name, colour in colours.items():
        y = PANEL_H * rows + LEGEND_H // 2
        draw.line([x, y, x + 18, y], fill=colour, width=3)
        draw.text((x + 22, y - 7), name, fill="black", font=font)
        x += 34 + int(draw.textlength(name, font=font))
    return image


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


def save_figure(image: Image.Image, path: str | os.PathLike) -> None:
    """Save a figure as PNG under a temporary name, then rename it into place (no half-written file)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def _draw_panel(draw, font, origin, series, axis, panel, xs, log_x, colours) -> None:
    ox, oy = origin
    x0, x1 = ox + LEFT, ox + PANEL_W - RIGHT
    y0, y1 = oy + TOP, oy + PANEL_H - BOTTOM
    scale = _log10 if panel.log_y else float
    values = [_value(p, panel.metric, scale) for points in series.values() for p in points]
    values = [v for v in values if v is not None]
    if panel.y_range is None:
        low, high = _data_range(values, from_zero=not panel.log_y)
    else:
        low, high = (scale(v) for v in panel.y_range)
    if not high > low:  # one value, or a degenerate given range
        low, high = low - 0.5, low + 0.5
    clipped = any(v < low or v > high for v in values)
    position = np.log if log_x and xs and xs[0] > 0 else (lambda v: v)
    left, right = (position(xs[0]), position(xs[-1])) if xs else (0.0, 1.0)
    span = right - left if right > left else 1.0

    def px(v: float) -> float:
        return x0 + (position(v) - left) / span * (x1 - x0)

    def py(v: float) -> float:
        return y1 - (min(max(v, low), high) - low) / (high - low) * (y1 - y0)

    draw.text((x0, oy + 8), panel.title + (" (clipped)" if clipped else ""), fill="black", font=font)
    draw.rectangle([x0, y0, x1, y1], outline=FRAME_GREY)
    for tick in _log_ticks(low, high) if panel.log_y else nice_ticks(low, high):
        draw.line([x0 - 4, py(tick), x0, py(tick)], fill=FRAME_GREY)
        label = f"{10**tick:.3g}" if panel.log_y else f"{tick:g}"
        draw.text((x0 - 8 - draw.textlength(label, font=font), py(tick) - 7), label, fill="black", font=font)
    # Every x value is a tick while they are few (step counts, guidance scales); a long run gets round ticks.
    for v in xs if len(xs) <= MAX_VALUE_TICKS else nice_ticks(xs[0], xs[-1]):
        label = f"{v:g}"
        draw.line([px(v), y1, px(v), y1 + 4], fill=FRAME_GREY)
        draw.text((px(v) - draw.textlength(label, font=font) / 2, y1 + 6), label, fill="black", font=font)
    draw.text(((x0 + x1) / 2 - draw.textlength(axis, font=font) / 2, y1 + 24), axis, fill="black", font=font)
    for ref in panel.references:
        ref = scale(ref)
        if ref is not None and low <= ref <= high:
            for start in range(int(x0), int(x1), 8):
                draw.line([start, py(ref), min(start + 4, x1), py(ref)], fill=GRID_GREY)
    for name, points in series.items():
        xy = [(px(float(p[axis])), py(v)) for p in points if (v := _value(p, panel.metric, scale)) is not None]
        if len(xy) > 1:
            draw.line(xy, fill=colours[name], width=2)
        if len(xy) <= MAX_DOTS:
            for x, y in xy:
                draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=colours[name])


def _log_ticks(low: float, high: float) -> list[float]:
    """Tick positions (log10 values) for a log axis from 10^low to 10^high: powers of ten over a wide range, else
    round values of the quantity itself."""
    if high - low >= 1.5:
        powers = [t for t in nice_ticks(low, high) if float(t).is_integer()]
        if len(powers) >= 2:
            return powers
    return [math.log10(v) for v in nice_ticks(10**low, 10**high) if v > 0]


def _log10(value: float) -> float | None:
    return math.log10(value) if value > 0 else None


def _value(point: Mapping[str, float | None], metric: str, scale) -> float | None:
    """The point's value of ``metric`` on the panel's scale, or None where it is missing, not finite or not drawable."""
    value = point.get(metric)
    if value is None or not math.isfinite(value):
        return None
    return scale(float(value))


def _data_range(values: Sequence[float], *, from_zero: bool) -> tuple[float, float]:
    """The values' range with 5 % to spare, from 0 where ``from_zero`` and they are all positive and close to it."""
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if from_zero and 0 <= low < 0.5 * high:
        low = 0.0
    pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.5
    return low - (0.0 if from_zero and low == 0 else pad), high + pad
