"""Draw docs/images/simulated.png: a simulated iSCAT image and its mask over it. Needs pillow."""

from pathlib import Path

import numpy as np
from PIL import Image

from napari_iscat_diffusion.iscat.simulate import SimulationParameters, simulate

CLASS_COLOURS = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1]])


def main() -> None:
    """Simulate one default 256x256 image (seed 3) and save the figure, scaled x2."""
    result = simulate(SimulationParameters(), 3)
    image, mask = result.image, result.mask
    low, high = np.percentile(image, [0.5, 99.5])
    grey = np.repeat(np.clip((image - low) / (high - low), 0, 1)[..., None], 3, axis=-1)
    overlay = grey.copy()
    labelled = mask > 0
    overlay[labelled] = 0.4 * overlay[labelled] + 0.6 * CLASS_COLOURS[mask[labelled]]
    figure = np.concatenate([grey, np.ones((image.shape[0], 4, 3)), overlay], axis=1)
    out = Path(__file__).parent / "images" / "simulated.png"
    picture = Image.fromarray((figure * 255).astype(np.uint8))
    picture.resize((2 * figure.shape[1], 2 * figure.shape[0]), Image.NEAREST).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
