"""Screenshots of the two dock widgets with a generated image, for the README and docs/plugin.md.

Needs a display; on a machine without one run it under Xvfb with the xcb platform, which (unlike
``offscreen``) draws the whole window:

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_screenshots.py

Uses the bundled default model, or ``--checkpoint FILE``; without either, an untrained tiny model
(the widgets look the same, the image is noise).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-iscat-diffusion"


def _wait(done, timeout: float = 600.0) -> None:
    """Run Qt's event loop until ``done()`` is true (and at least once)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    QApplication.processEvents()
    while not done():
        if time.monotonic() > end:
            raise TimeoutError("generation did not finish in time")
        QApplication.processEvents()
        time.sleep(0.01)


def main() -> None:
    """Dock both widgets, generate an image for the sample mask and save screenshots into docs/images/."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="model to use [bundled default]")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps [the sampler's default]")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()

    from napari_iscat_diffusion._sample_data import simulated_pair
    from napari_iscat_diffusion.models import bundled_checkpoints

    checkpoint = args.checkpoint
    with tempfile.TemporaryDirectory() as folder:
        if checkpoint is None and not bundled_checkpoints():
            sys.path.insert(0, str(ROOT))
            from tests.tiny_models import save_tiny_checkpoint

            checkpoint = Path(folder) / "untrained-tiny.safetensors"
            save_tiny_checkpoint(checkpoint, num_classes=3)
        viewer = napari.Viewer(title="napari-iscat-diffusion")
        viewer.window.resize(1500, 950)
        _, mask_data = simulated_pair()
        mask, meta, _ = mask_data
        layer = viewer.add_labels(np.asarray(mask), name="particles", scale=meta["scale"], units="um")
        export_dock, export_widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Batch export")
        generate_dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Generate synthetic iSCAT", tabify=True)
        for chooser in (widget.checkpoint, export_widget.checkpoint):
            if checkpoint is not None:
                chooser.set_path(checkpoint)
        widget.mask_layer.setCurrentText(layer.name)
        if args.steps is not None:
            widget.sampler.steps.setValue(args.steps)
        widget.sampler.seed.setValue(7)
        widget.generate_button.click()
        _wait(lambda: not widget.job.running and widget.generate_button.isEnabled())
        viewer.layers[layer.name].opacity = 0.4
        viewer.layers.move(viewer.layers.index(layer), len(viewer.layers))  # mask drawn over the image
        viewer.reset_view()
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for dock, name in ((generate_dock, "plugin_generate.png"), (export_dock, "plugin_batch_export.png")):
            dock.raise_()  # the two widgets share a tabbed dock: show this one
            _wait(lambda: True)
            viewer.screenshot(str(args.out / name), canvas_only=False, flash=False)
            written.append(args.out / name)
        viewer.close()
    print("wrote " + ", ".join(str(path) for path in written))


if __name__ == "__main__":
    main()
