"""The Batch export dock widget in a real napari viewer (Qt under Xvfb) with a tiny untrained model."""

import time

import numpy as np
import pytest
from napari.utils.notifications import ErrorNotification, NotificationSeverity, notification_manager

from napari_iscat_diffusion._widgets import _controls
from napari_iscat_diffusion._widgets.batch_export import SOURCES
from napari_iscat_diffusion.export import MANIFEST, ExportSummary, finished_pairs

TIMEOUT_MS = 60_000


@pytest.fixture
def viewer_and_widget(make_napari_viewer, monkeypatch, tiny_checkpoint, tmp_path):
    """A viewer with the Batch export widget docked: 3 random 16x16 masks, 2 steps on the CPU, into tmp_path/out."""
    monkeypatch.setattr(_controls, "bundled_checkpoints", lambda: {"tiny": tiny_checkpoint})
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-iscat-diffusion", "Batch export")
    widget.source.setCurrentText(SOURCES[2])
    widget.random_count.setValue(3)
    widget.random_height.setValue(16)
    widget.random_width.setValue(16)
    widget.random_particles.setValue(3)
    widget.output.setText(str(tmp_path / "out"))
    widget.sampler.steps.setValue(2)
    widget.sampler.device.setCurrentText("cpu")
    return viewer, widget


def _run(qtbot, widget) -> None:
    widget.export_button.click()
    assert widget.job is not None and not widget.export_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.job.running and widget.export_button.isEnabled(), timeout=TIMEOUT_MS)


def _files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*.tif"))}


def test_export_writes_pairs_and_a_second_run_resumes_without_overwriting(viewer_and_widget, qtbot, tmp_path):
    _, widget = viewer_and_widget
    out = tmp_path / "out"
    _run(qtbot, widget)
    assert "Wrote 3 pair(s), skipped 0" in widget.status.text()
    assert sorted(finished_pairs(out)) == [f"random_{i:05d}_s000" for i in range(3)]
    files = _files(out)
    assert len(files) == 6
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.tif")}
    _run(qtbot, widget)
    assert "Wrote 0 pair(s), skipped 3" in widget.status.text()
    assert _files(out) == files
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())
    widget.random_count.setValue(4)  # one more mask: only the new pair is made
    _run(qtbot, widget)
    assert "Wrote 1 pair(s), skipped 3" in widget.status.text()
    assert len((out / MANIFEST).read_text().splitlines()) == 1 + 4


def test_a_3d_labels_layer_exports_one_pair_per_plane(viewer_and_widget, qtbot, tmp_path):
    viewer, widget = viewer_and_widget
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[:, 4:8, 4:8] = 1
    viewer.add_labels(masks, name="my stack")
    widget.source.setCurrentText(SOURCES[0])
    widget.mask_layer.setCurrentText("my stack")
    widget.samples.setValue(2)
    _run(qtbot, widget)
    names = sorted(finished_pairs(tmp_path / "out"))
    assert names == [f"my_stack_z{p:04d}_s{s:03d}" for p in range(2) for s in range(2)]


def test_cancel_keeps_finished_pairs_and_gives_the_controls_back(viewer_and_widget, qtbot):
    _, widget = viewer_and_widget
    widget.sampler.steps.setValue(1000)
    widget.export_button.click()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=TIMEOUT_MS)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.job.running and widget.export_button.isEnabled(), timeout=TIMEOUT_MS)
    assert "Cancelled after 0 new pair(s)" in widget.status.text()
    assert all(control.isEnabled() for control in widget._controls) and not widget.cancel_button.isEnabled()


def test_cancel_reaches_the_export_inside_a_step_through_should_stop(viewer_and_widget, qtbot, monkeypatch):
    import napari_iscat_diffusion._widgets.batch_export as batch_export_module

    _, widget = viewer_and_widget
    started = []

    def one_endless_step(masks, model, folder, *args, should_stop, **kwargs):
        # a step that never ends, like one over many tiles: only should_stop can end it
        started.append(True)
        while not should_stop():
            time.sleep(0.01)
        return ExportSummary(folder, 0, 0, cancelled=True)

    monkeypatch.setattr(batch_export_module, "export_pairs", one_endless_step)
    widget.export_button.click()
    qtbot.waitUntil(lambda: bool(started), timeout=TIMEOUT_MS)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.job.running and widget.export_button.isEnabled(), timeout=TIMEOUT_MS)
    assert "Cancelled after 0 new pair(s)" in widget.status.text()


@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda viewer, widget: widget.output.setText(""), "output folder"),
        (lambda viewer, widget: _image_as_source(viewer, widget), "Labels layer"),
        (lambda viewer, widget: widget.random_proportions.setText("a lot"), "proportions"),
        (lambda viewer, widget: widget.source.setCurrentText(SOURCES[1]), "folder of mask TIFFs"),
    ],
)
def test_bad_input_gives_a_notification_and_starts_nothing(viewer_and_widget, setup, words):
    viewer, widget = viewer_and_widget
    setup(viewer, widget)
    start = len(notification_manager.records)
    widget.export_button.click()
    new = notification_manager.records[start:]
    assert len(new) == 1 and words in new[0].message, [n.message for n in new]
    assert new[0].severity == NotificationSeverity.ERROR and not isinstance(new[0], ErrorNotification)
    assert widget.job is None and widget.export_button.isEnabled()


def test_an_error_during_the_export_becomes_a_notification(viewer_and_widget, qtbot, tmp_path):
    _, widget = viewer_and_widget
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "random_00000_s000.tif").write_bytes(b"somebody else's file")
    start = len(notification_manager.records)
    _run(qtbot, widget)
    [note] = notification_manager.records[start:]
    assert "random_00000_s000.tif" in note.message and not isinstance(note, ErrorNotification)
    assert widget.status.text() == "Failed."


def _image_as_source(viewer, widget) -> None:
    viewer.add_image(np.zeros((16, 16), np.float32), name="picture")
    widget.source.setCurrentText(SOURCES[0])
    widget.mask_layer.setCurrentText("picture")
