"""``python -m napari_iscat_diffusion.cli`` (as torchrun starts ``export``): the command line."""

import sys

from . import main

sys.exit(main())
