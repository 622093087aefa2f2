"""Shared fixtures: napari settings kept out of the home folder, and a tiny model checkpoint."""

import atexit
import os
import shutil
import tempfile

import pytest

# napari reads its settings folder when it is first imported: point it at a throw-away folder before that.
_SETTINGS = tempfile.mkdtemp(prefix="iscat-tests-")
atexit.register(shutil.rmtree, _SETTINGS, ignore_errors=True)
os.environ["XDG_CONFIG_HOME"] = os.path.join(_SETTINGS, "config")
os.environ["XDG_CACHE_HOME"] = os.path.join(_SETTINGS, "cache")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny 2-class model saved as ``tiny.safetensors`` (shared by the whole session; do not modify)."""
    from tests.tiny_models import save_tiny_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_tiny_checkpoint(path)
    return path
