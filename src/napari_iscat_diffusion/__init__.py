"""napari-iscat-diffusion: synthetic iSCAT images from segmentation masks with a mask-conditioned diffusion model.

Importing this package is cheap: torch is imported only by ``napari_iscat_diffusion.diffusion``
and the modules that need it, so napari starts fast with the plugin installed.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-iscat-diffusion")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
