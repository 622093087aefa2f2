"""Training package for napari-iscat-diffusion models.

Needs no napari and no Qt. It shares the U-Net, the schedules and the checkpoint format with the
plugin (``napari_iscat_diffusion.diffusion``): there is no second copy of any of them.
"""
