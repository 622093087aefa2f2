"""Draw docs/images/curves_steps.png: the bundled model's noise ratio and two-sample accuracy against sampler steps,
one line per sampler, from the curves of `iscat-diffusion evaluate --curves`. Needs pillow.

    python docs/make_curves_figure.py [benchmarks/results/evaluation_curves_stage6_128px_curves/curves.json]
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).parent
DEFAULT_CURVES = HERE.parent / "benchmarks/results/evaluation_curves_stage6_128px_curves/curves.json"
COLOURS = {
    "dpmpp_2m": (0, 90, 200),
    "dpmpp_2m_sde": (90, 170, 255),
    "heun": (220, 120, 0),
    "euler": (0, 150, 70),
    "ddim": (150, 60, 170),
    "ddpm": (200, 30, 30),
}
# (metric, title, y range, y ticks, dashed reference lines: the physics' noise; chance and the 0.65 target)
PANELS = (
    ("noise_ratio", "background noise / physics (clipped at 1.4)", (0.4, 1.4), np.arange(0.4, 1.41, 0.2), (1.0,)),
    ("c2st_accuracy", "two-sample classifier accuracy", (0.4, 1.04), np.arange(0.4, 1.01, 0.1), (0.5, 0.65)),
)
PANEL_W, PANEL_H, LEFT, TOP, BOTTOM = 420, 300, 60, 40, 40


def _panel(draw, font, origin_x, curves, key, title, y_range, ticks, references):
    """One panel: a log-x steps axis, y in ``y_range`` with ``ticks``, dashed grey lines at ``references``, a line
    per sampler."""
    steps = sorted({p["steps"] for points in curves.values() for p in points})
    x0, x1 = origin_x + LEFT, origin_x + PANEL_W - 10
    y0, y1 = TOP, TOP + PANEL_H - BOTTOM - TOP

    def px(s):
        return x0 + (np.log(s) - np.log(steps[0])) / (np.log(steps[-1]) - np.log(steps[0])) * (x1 - x0)

    def py(v):
        v = min(max(v, y_range[0]), y_range[1])
        return y1 - (v - y_range[0]) / (y_range[1] - y_range[0]) * (y1 - y0)

    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    draw.text((x0, 12), title, fill=(0, 0, 0), font=font)
    for s in steps:
        draw.text((px(s) - 6, y1 + 6), str(s), fill=(0, 0, 0), font=font)
    draw.text(((x0 + x1) / 2 - 15, y1 + 22), "steps", fill=(0, 0, 0), font=font)
    for tick in ticks:
        draw.text((origin_x + 18, py(tick) - 6), f"{tick:.2f}", fill=(0, 0, 0), font=font)
    for ref in references:
        for start in range(int(x0), int(x1), 8):
            draw.line([start, py(ref), min(start + 4, x1), py(ref)], fill=(150, 150, 150))
    for name, points in curves.items():
        xy = [(px(p["steps"]), py(p[key])) for p in points if p[key] is not None]
        draw.line(xy, fill=COLOURS.get(name, (0, 0, 0)), width=3 if name == "dpmpp_2m" else 2)


def main() -> None:
    """Read the curves JSON (argument or the bundled model's) and write the two-panel figure."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CURVES
    curves = json.loads(path.read_text())["steps"]
    font = ImageFont.load_default(size=13)
    legend_h = 24
    image = Image.new("RGB", (PANEL_W * len(PANELS), PANEL_H + legend_h), "white")
    draw = ImageDraw.Draw(image)
    for i, panel in enumerate(PANELS):
        _panel(draw, font, i * PANEL_W, curves, *panel)
    x = LEFT
    for name in curves:
        draw.line([x, PANEL_H + 8, x + 18, PANEL_H + 8], fill=COLOURS.get(name, (0, 0, 0)), width=3)
        draw.text((x + 22, PANEL_H + 1), name, fill=(0, 0, 0), font=font)
        x += 34 + int(draw.textlength(name, font=font))
    out = HERE / "images" / "curves_steps.png"
    image.save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
