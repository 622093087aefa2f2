"""Draw docs/images/curves_steps.png: the bundled model's noise ratio and two-sample accuracy against sampler steps,
one line per sampler, from the curves of `iscat-diffusion evaluate --curves` (which draws every metric the same way
in steps.png beside its curves.json).

    python docs/make_curves_figure.py [benchmarks/results/evaluation_curves_stage13_rounds5_128px_curves/curves.json]
"""

import json
import sys
from pathlib import Path

from napari_iscat_diffusion.evaluation.plots import Panel, curves_figure, metric_panel, save_figure

HERE = Path(__file__).parent
DEFAULT_CURVES = HERE.parent / "benchmarks/results/evaluation_curves_stage13_rounds5_128px_curves/curves.json"
# The noise ratio's range narrowed to where the samplers differ (Heun's 5 steps, 3.6, is drawn at the top).
PANELS = (Panel("noise_ratio", "background noise / physics", (0.4, 1.4), (1.0,)), metric_panel("c2st_accuracy"))


def main() -> None:
    """Read the curves JSON (argument or the bundled model's) and write the two-panel figure."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CURVES
    curves = json.loads(path.read_text())["steps"]
    out = HERE / "images" / "curves_steps.png"
    save_figure(curves_figure(curves, "steps", PANELS, log_x=True), out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
