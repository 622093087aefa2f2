"""Import hygiene: napari starts fast with the plugin installed, and the core never needs napari or Qt."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(result.stdout.split())


def test_importing_the_plugin_package_does_not_import_torch():
    modules = _modules_after("import napari_iscat_diffusion")
    assert "torch" not in modules


def test_diffusion_core_and_training_import_no_napari_or_qt():
    modules = _modules_after("import napari_iscat_diffusion.diffusion, training.losses")
    assert "torch" in modules
    gui = sorted(m for m in modules if m.split(".")[0] in {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6"})
    assert gui == []


def test_simulator_io_and_command_line_need_no_torch():
    statement = (
        "import napari_iscat_diffusion.iscat.simulate, napari_iscat_diffusion.io.dataset_check, "
        "napari_iscat_diffusion.cli as c; c._build_parser()"
    )
    modules = _modules_after(statement)
    assert "torch" not in modules
    assert not any(m.split(".")[0] in {"napari", "qtpy"} for m in modules)
