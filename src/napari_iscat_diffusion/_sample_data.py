"""napari sample data: a simulated iSCAT image with its mask (numpy only; no torch)."""

from __future__ import annotations

from .iscat.simulate import SimulationParameters, simulate

SAMPLE_SEED = 2024


def simulated_pair() -> list[tuple]:
    """A 256x256 simulated iSCAT contrast image and its label mask, as napari layer data (fixed seed)."""
    params = SimulationParameters()
    result = simulate(params, SAMPLE_SEED)
    scale = (params.pixel_size_nm / 1000,) * 2  # micrometres per pixel
    image_meta = {"name": "simulated iSCAT", "scale": scale, "units": "um", "colormap": "gray"}
    mask_meta = {"name": "simulated mask", "scale": scale, "units": "um"}
    return [(result.image, image_meta, "image"), (result.mask, mask_meta, "labels")]
