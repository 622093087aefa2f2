"""The Generate dock widget in a real napari viewer (Qt under Xvfb) with a tiny untrained model."""

import dataclasses
import time

import napari
import numpy as np
import pytest
from napari.utils.notifications import ErrorNotification, NotificationSeverity, notification_manager
from qtpy.QtCore import Qt, QTimer
from tests.tiny_models import save_tiny_checkpoint, uniform_contrast_prior

from napari_iscat_diffusion import __version__
from napari_iscat_diffusion._widgets import _controls
from napari_iscat_diffusion.diffusion import SAMPLERS, SamplingCancelled, generate, load_checkpoint, save_checkpoint

PLUGIN = "napari-iscat-diffusion"
TIMEOUT_MS = 60_000


@pytest.fixture
def bundled_tiny(monkeypatch, tiny_checkpoint):
    """The tiny model stands in for the bundled default the widgets offer first."""
    monkeypatch.setattr(_controls, "bundled_checkpoints", lambda: {"tiny": tiny_checkpoint})
    return tiny_checkpoint


@pytest.fixture
def viewer_and_widget(make_napari_viewer, bundled_tiny):
    """A viewer with the Generate widget docked, set to 2 steps on the CPU."""
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Generate synthetic iSCAT")
    widget.sampler.steps.setValue(2)
    widget.sampler.device.setCurrentText("cpu")
    return viewer, widget


@pytest.fixture
def notifications():
    """Notifications dispatched during the test (napari keeps them all in ``notification_manager.records``)."""
    start = len(notification_manager.records)

    class New:
        def __call__(self):
            return notification_manager.records[start:]

    return New()


def _mask(shape=(16, 24)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[..., 4:8, 5:9] = 1
    mask[..., 10:13, 14:17] = 2
    return mask


def _pick(widget, layer) -> None:
    widget.mask_layer.setCurrentText(layer.name)
    assert widget.mask_layer.layer() is layer


def _run(qtbot, widget) -> None:
    """Click Generate and wait until the worker has finished and the widget has handled the outcome."""
    widget.generate_button.click()
    assert widget.job is not None and not widget.generate_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.job.running and widget.generate_button.isEnabled(), timeout=TIMEOUT_MS)


def test_both_widgets_dock_by_plugin_name_and_offer_the_bundled_model(make_napari_viewer, bundled_tiny):
    viewer = make_napari_viewer()
    _, generate_widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Generate synthetic iSCAT")
    _, export_widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Batch export")
    assert type(generate_widget).__name__ == "GenerateWidget"
    assert type(export_widget).__name__ == "BatchExportWidget"
    for widget in (generate_widget, export_widget):
        assert widget.checkpoint.combo.currentText() == "tiny"
        assert widget.checkpoint.model is not None and widget.checkpoint.model.path == bundled_tiny
        assert "2 classes" in widget.checkpoint.summary.text()
        for label in (widget.checkpoint.summary, widget.status):  # file and layer names, never read as HTML
            assert label.textFormat() == Qt.TextFormat.PlainText


def test_layer_picker_follows_the_layer_list(viewer_and_widget):
    viewer, widget = viewer_and_widget
    picker = widget.mask_layer
    image = viewer.add_image(np.zeros((8, 8)), name="img")
    labels = viewer.add_labels(np.zeros((8, 8), np.uint8), name="lab")
    assert [picker.itemText(i) for i in range(picker.count())] == ["lab", "img"]  # Labels layers first
    labels.name = "renamed"
    assert picker.findText("renamed") >= 0 and picker.findText("lab") < 0
    viewer.layers.remove(image)
    assert [picker.itemText(i) for i in range(picker.count())] == ["renamed"]


def test_generate_adds_a_layer_with_the_masks_geometry_and_provenance(viewer_and_widget, qtbot, bundled_tiny):
    viewer, widget = viewer_and_widget
    labels = viewer.add_labels(_mask(), name="cells", scale=(0.06, 0.05), translate=(3.0, -2.0), units="um")
    _pick(widget, labels)
    widget.sampler.seed.setValue(11)
    widget.sampler.guidance.setValue(1.5)
    _run(qtbot, widget)
    qtbot.wait(50)  # late events must not overwrite the final status
    assert widget.status.text() == "Done."
    layer = viewer.layers["synthetic (cells)"]
    assert isinstance(layer, napari.layers.Image)
    assert layer.data.shape == (16, 24) and layer.data.dtype == np.float32
    np.testing.assert_allclose(layer.scale, (0.06, 0.05))
    np.testing.assert_allclose(layer.translate, (3.0, -2.0))
    assert [str(unit) for unit in layer.units] == ["micrometer", "micrometer"]
    model = load_checkpoint(bundled_tiny)
    assert layer.metadata["seed"] == 11
    assert layer.metadata["checkpoint_sha256"] == model.sha256
    assert layer.metadata["sampler"] == "dpmpp_2m" and layer.metadata["steps"] == 2
    assert layer.metadata["guidance"] == 1.5
    assert layer.metadata["package_version"] == __version__
    assert layer.metadata["source_mask"] == "cells"
    low, high = layer.contrast_limits
    assert low < np.median(layer.data) < high  # centred on the background, not on min/max
    expected = generate(_mask(), model, sampler="dpmpp_2m", steps=2, guidance=1.5, seed=11, device="cpu")
    np.testing.assert_array_equal(layer.data, expected)
    assert widget.progress_bar.value() == widget.progress_bar.maximum() == 2


def test_the_same_seed_gives_the_same_image(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m"))
    images = []
    for seed in (5, 5, 6):
        widget.sampler.seed.setValue(seed)
        _run(qtbot, widget)
        images.append(np.array(viewer.layers[-1].data))
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_random_seed_button_and_sampler_default_steps(viewer_and_widget):
    _, widget = viewer_and_widget
    seeds = set()
    for _ in range(3):
        widget.sampler.random_seed.click()
        seeds.add(widget.sampler.seed.value())
    assert len(seeds) > 1
    widget.sampler.sampler.setCurrentIndex(widget.sampler.sampler.findData("ddpm"))
    ddpm_steps = widget.sampler.steps.value()
    widget.sampler.sampler.setCurrentIndex(widget.sampler.sampler.findData("heun"))
    assert widget.sampler.steps.value() < ddpm_steps


def test_each_sampler_says_what_it_is_in_its_tooltip(viewer_and_widget):
    _, widget = viewer_and_widget
    combo = widget.sampler.sampler
    tooltips = {combo.itemData(i): combo.itemData(i, Qt.ItemDataRole.ToolTipRole) for i in range(combo.count())}
    assert tooltips == {name: info.description for name, info in SAMPLERS.items()}
    assert all(tooltips.values()) and "first order" in tooltips["euler"] and "first order" not in tooltips["heun"]


def test_several_samples_become_one_stack_layer(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m", scale=(2.0, 3.0), units="nm"))
    widget.samples.setValue(2)
    _run(qtbot, widget)
    layer = viewer.layers["synthetic (m)"]
    assert layer.data.shape == (2, 16, 24)
    np.testing.assert_allclose(layer.scale, (1.0, 2.0, 3.0))
    assert [str(unit) for unit in layer.units] == ["pixel", "nanometer", "nanometer"]
    assert not np.array_equal(layer.data[0], layer.data[1])


def test_a_3d_labels_layer_gives_one_image_per_plane(viewer_and_widget, qtbot, bundled_tiny):
    viewer, widget = viewer_and_widget
    masks = np.stack([_mask(), np.zeros((16, 24), np.uint8), _mask()[::-1]])
    _pick(widget, viewer.add_labels(masks, name="stack", scale=(1.0, 0.5, 0.5)))
    widget.sampler.seed.setValue(3)
    _run(qtbot, widget)
    layer = viewer.layers["synthetic (stack)"]
    assert layer.data.shape == (3, 16, 24)
    np.testing.assert_allclose(layer.scale, (1.0, 0.5, 0.5))
    model = load_checkpoint(bundled_tiny)
    for plane in range(3):  # plane p has seed + p, exactly as a direct call makes it
        expected = generate(masks[plane], model, steps=2, seed=3 + plane, device="cpu")
        np.testing.assert_array_equal(layer.data[plane], expected)
    assert widget.progress_bar.maximum() == 2  # one batch of 3 planes (batch size 4), 2 steps


def test_show_denoising_steps_adds_a_stack_of_the_predictions(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m"))
    widget.sampler.steps.setValue(3)
    widget.show_steps.setChecked(True)
    _run(qtbot, widget)
    steps = viewer.layers["denoising steps (m)"]
    assert steps.data.shape == (3, 16, 24)
    np.testing.assert_allclose(steps.data[-1], viewer.layers["synthetic (m)"].data, atol=1e-6)


def test_new_mask_and_random_particles_start_without_data(viewer_and_widget):
    _, widget = viewer_and_widget
    widget.mask_height.setValue(32)
    widget.mask_width.setValue(40)
    widget.new_mask.click()
    layer = widget.mask_layer.layer()
    assert isinstance(layer, napari.layers.Labels) and layer.data.shape == (32, 40) and not layer.data.any()
    widget.particle_count.setValue(5)
    widget.proportions.setText("0.5, 0.5")
    widget.random_particles.click()
    assert set(np.unique(layer.data)) - {0} <= {1, 2} and layer.data.any()


def test_cancel_stops_the_worker_adds_no_layer_and_gives_the_controls_back(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m"))
    widget.sampler.steps.setValue(1000)
    widget.generate_button.click()
    assert not widget.sampler.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=TIMEOUT_MS)
    clicked = time.perf_counter()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.job.running and widget.generate_button.isEnabled(), timeout=TIMEOUT_MS)
    assert time.perf_counter() - clicked < 2.0  # 1000 steps take over 5 s; Cancel stops within a step
    assert widget.job.worker.is_running is False
    assert [layer.name for layer in viewer.layers] == ["m"]
    assert all(control.isEnabled() for control in widget._controls)
    assert not widget.cancel_button.isEnabled()
    assert "Cancelled" in widget.status.text()
    widget.sampler.steps.setValue(2)
    _run(qtbot, widget)  # still usable: the next run completes
    assert "synthetic (m)" in viewer.layers


def test_cancel_reaches_generation_inside_a_step_through_should_stop(viewer_and_widget, qtbot, monkeypatch):
    import napari_iscat_diffusion._widgets.generate as generate_module

    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m"))
    started = []

    def one_endless_step(*args, should_stop, **kwargs):
        # a step that never ends, like one over many tiles: only should_stop can end it
        started.append(True)
        while not should_stop():
            time.sleep(0.01)
        raise SamplingCancelled(-1)

    monkeypatch.setattr(generate_module, "synthesize", one_endless_step)
    widget.generate_button.click()
    qtbot.waitUntil(lambda: bool(started), timeout=TIMEOUT_MS)
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.job.running and widget.generate_button.isEnabled(), timeout=TIMEOUT_MS)
    assert "Cancelled" in widget.status.text() and [layer.name for layer in viewer.layers] == ["m"]


def _assert_refused(viewer, widget, notifications, qtbot, words: tuple[str, ...]) -> None:
    """Generate was refused with one error notification naming the problem; no worker, no layer, no exception."""
    layers = len(viewer.layers)
    widget.generate_button.click()
    new = notifications()
    assert len(new) == 1, [n.message for n in new]
    assert new[0].severity == NotificationSeverity.ERROR and not isinstance(new[0], ErrorNotification)
    for word in words:
        assert word in new[0].message
    assert widget.job is None and len(viewer.layers) == layers and widget.generate_button.isEnabled()


def test_an_image_layer_as_mask_is_refused_with_a_notification(viewer_and_widget, notifications, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_image(_mask().astype(np.float32), name="picture"))
    _assert_refused(viewer, widget, notifications, qtbot, ("'picture'", "Image layer", "Labels"))


def test_4d_data_is_refused_with_a_notification(viewer_and_widget, notifications, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(np.zeros((2, 2, 16, 16), np.uint8), name="movie"))
    _assert_refused(viewer, widget, notifications, qtbot, ("'movie'", "4 dimensions"))


def test_class_guidance_is_filled_from_the_model_used_and_recorded(viewer_and_widget, qtbot, bundled_tiny):
    viewer, widget = viewer_and_widget
    assert widget.sampler.class_guidance.text() == ""  # the tiny model has no per-class guidance
    model = load_checkpoint(bundled_tiny)
    model.config.default_class_guidance = {2: 3.0}
    widget.sampler.use_model_defaults(model)
    assert widget.sampler.class_guidance.text() == "2=3"
    widget.sampler.steps.setValue(2)
    _pick(widget, viewer.add_labels(_mask(), name="cells"))
    widget.sampler.seed.setValue(5)
    widget.sampler.guidance.setValue(1.5)
    widget.sampler.class_guidance.setText("2=2.5")
    _run(qtbot, widget)
    layer = viewer.layers["synthetic (cells)"]
    assert layer.metadata["class_guidance"] == "2=2.5" and layer.metadata["guidance_interval"] == "all"
    expected = generate(_mask(), model, steps=2, guidance=1.5, class_guidance={2: 2.5}, seed=5, device="cpu")
    np.testing.assert_array_equal(layer.data, expected)


def test_sampler_and_steps_follow_the_defaults_of_the_chosen_model(viewer_and_widget, bundled_tiny, tmp_path):
    _, widget = viewer_and_widget
    tiny = load_checkpoint(bundled_tiny)
    fewer = tmp_path / "fewer.safetensors"
    config = dataclasses.replace(tiny.config, default_steps={"dpmpp_2m": 7}, default_sampler="dpmpp_2m_sde")
    save_checkpoint(fewer, tiny.net, config)
    assert widget.sampler.sampler.currentData() == "dpmpp_2m"
    widget.checkpoint.set_path(fewer)
    assert widget.sampler.sampler.currentData() == "dpmpp_2m_sde"
    assert widget.sampler.steps.value() == SAMPLERS["dpmpp_2m_sde"].default_steps
    widget.sampler.sampler.setCurrentIndex(widget.sampler.sampler.findData("dpmpp_2m"))
    assert widget.sampler.steps.value() == 7
    widget.sampler.steps.setValue(3)
    widget.checkpoint.combo.activated.emit(widget.checkpoint.combo.currentIndex())  # the same model again
    assert widget.sampler.steps.value() == 3
    widget.sampler.sampler.setCurrentIndex(widget.sampler.sampler.findData("euler"))
    assert widget.sampler.steps.value() == SAMPLERS["euler"].default_steps
    widget.sampler.sampler.setCurrentIndex(widget.sampler.sampler.findData("dpmpp_2m"))
    assert widget.sampler.steps.value() == 7
    widget.checkpoint.set_path(bundled_tiny)
    assert widget.sampler.sampler.currentData() == "dpmpp_2m"
    assert widget.sampler.steps.value() == SAMPLERS["dpmpp_2m"].default_steps


@pytest.mark.parametrize(("text", "words"), [("2=much", ("'much'", "class 2")), ("5=2", ("5", "labels 1..2"))])
def test_bad_class_guidance_is_refused_with_a_notification(viewer_and_widget, notifications, qtbot, text, words):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="cells"))
    widget.sampler.class_guidance.setText(text)
    _assert_refused(viewer, widget, notifications, qtbot, words)


def test_labels_above_the_models_classes_are_refused_with_a_notification(viewer_and_widget, notifications, qtbot):
    viewer, widget = viewer_and_widget
    mask = _mask()
    mask[0, 0] = 7
    _pick(widget, viewer.add_labels(mask, name="too many"))
    _assert_refused(viewer, widget, notifications, qtbot, ("'too many'", "7"))


def test_a_bad_checkpoint_gives_a_notification_and_the_viewer_keeps_working(
    viewer_and_widget, notifications, qtbot, tmp_path, bundled_tiny
):
    viewer, widget = viewer_and_widget
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"this is not a checkpoint")
    widget.checkpoint.set_path(bad)
    [note] = notifications()
    assert note.severity == NotificationSeverity.ERROR and not isinstance(note, ErrorNotification)
    assert "broken.safetensors" in note.message and "not a safetensors file" in note.message
    assert widget.checkpoint.model is None
    _pick(widget, viewer.add_labels(_mask(), name="m"))
    widget.generate_button.click()
    assert "No model loaded" in notifications()[-1].message and widget.job is None
    widget.checkpoint.set_path(bundled_tiny)  # choosing a good file again makes it work
    widget.sampler.steps.setValue(2)
    _run(qtbot, widget)
    assert "synthetic (m)" in viewer.layers


def test_an_error_inside_the_worker_becomes_a_notification(viewer_and_widget, notifications, qtbot, monkeypatch):
    import napari_iscat_diffusion._widgets.generate as generate_module

    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask(), name="m"))

    def fail(*args, **kwargs):
        raise RuntimeError("something broke in the sampler")

    monkeypatch.setattr(generate_module, "synthesize", fail)
    _run(qtbot, widget)
    [note] = notifications()
    assert "something broke in the sampler" in note.message and not isinstance(note, ErrorNotification)
    assert [layer.name for layer in viewer.layers] == ["m"] and widget.status.text() == "Failed."


def test_the_viewer_stays_responsive_during_generation(viewer_and_widget, qtbot):
    viewer, widget = viewer_and_widget
    _pick(widget, viewer.add_labels(_mask((32, 32)), name="m"))
    widget.sampler.steps.setValue(150)
    gaps: list[float] = []
    last = [0.0]

    def tick() -> None:
        now = time.perf_counter()
        if widget.job is not None and widget.job.running:  # only the time the worker computes counts
            gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(tick)
    timer.start()
    widget.generate_button.click()
    last[0] = time.perf_counter()
    qtbot.waitUntil(lambda: not widget.job.running and widget.generate_button.isEnabled(), timeout=TIMEOUT_MS)
    timer.stop()
    assert "synthetic (m)" in viewer.layers
    assert len(gaps) >= 30, f"only {len(gaps)} timer ticks while generating: the work blocked the main thread"
    # A quarter second is where a stall reads as a hang; the worker's share of the GIL alone gives gaps of
    # 110-180 ms when other jobs load a 2-core machine.
    assert max(gaps) < 0.25, f"the main thread stalled for {max(gaps) * 1000:.0f} ms"


def test_bad_class_proportions_give_a_notification(viewer_and_widget, notifications):
    _, widget = viewer_and_widget
    widget.new_mask.click()
    widget.proportions.setText("half, half")
    widget.random_particles.click()
    [note] = notifications()
    assert "class proportions must be numbers" in note.message and "'half, half'" in note.message
    assert not widget.mask_layer.layer().data.any()


def test_random_particles_of_classes_above_255_widen_a_uint8_mask_instead_of_wrapping(viewer_and_widget):
    _, widget = viewer_and_widget
    widget.new_mask.click()  # a uint8 layer: label 300 would be stored as 44
    widget.particle_count.setValue(5)
    widget.proportions.setText("0 " * 299 + "1")
    widget.random_particles.click()
    layer = widget.mask_layer.layer()
    assert set(np.unique(layer.data)) == {0, 300}


def test_random_particles_fill_the_shown_plane_of_a_stack_beside_a_longer_or_deeper_layer(
    viewer_and_widget, notifications
):
    viewer, widget = viewer_and_widget
    viewer.add_image(np.zeros((3, 10, 16, 16), np.float32), name="movie")  # napari aligns layers on their last axes
    layer = viewer.add_labels(np.zeros((2, 16, 16), np.uint8), name="stack")
    _pick(widget, layer)
    viewer.dims.current_step = (2, 1, 0, 0)
    widget.random_particles.click()
    assert not layer.data[0].any() and layer.data[1].any()
    viewer.dims.current_step = (0, 5, 0, 0)  # beyond the stack's 2 planes
    before = layer.data.copy()
    widget.random_particles.click()
    [note] = notifications()
    assert "'stack' has no plane at the position shown" in note.message
    np.testing.assert_array_equal(layer.data, before)


def test_checking_a_large_mask_layer_copies_none_of_it(viewer_and_widget):
    import tracemalloc

    viewer, widget = viewer_and_widget
    mask = np.zeros((2000, 2000), np.uint8)  # 4 MB; an int64 copy of it would be 32 MB
    _pick(widget, viewer.add_labels(mask, name="large"))
    tracemalloc.start()
    try:
        assert widget._mask_data() is not None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < mask.nbytes


def test_particle_contrasts_come_from_a_chosen_image_layer_for_a_model_with_the_channel(
    viewer_and_widget, qtbot, notifications, tmp_path
):
    viewer, widget = viewer_and_widget
    assert not widget.particle_contrast.isEnabled()  # the tiny default model draws contrasts itself
    path = tmp_path / "contrast.safetensors"
    prior = uniform_contrast_prior({1: (-2.0, -1.0), 2: (3.0, 6.0)})
    save_tiny_checkpoint(path, perturbed=True, contrast_channel=True, config_fields={"particle_contrast": prior})
    widget.checkpoint.set_path(path)
    assert widget.particle_contrast.isEnabled()
    widget.sampler.steps.setValue(2)  # the new model's default replaced the fixture's
    _pick(widget, viewer.add_labels(_mask(), name="cells"))
    widget.sampler.seed.setValue(4)
    given = np.where(_mask() == 2, 0.05, np.nan)  # 5 normalised units of the tiny model (std 0.01)
    viewer.add_image(given, name="contrasts")
    assert widget.particle_contrast.currentText() == "drawn from the model"
    _run(qtbot, widget)
    assert viewer.layers[-1].metadata["particle_contrast"] == "drawn from the model"
    drawn = np.array(viewer.layers[-1].data)
    widget.particle_contrast.setCurrentText("contrasts")
    _run(qtbot, widget)
    layer = viewer.layers[-1]
    assert layer.metadata["particle_contrast"] == "contrasts"
    expected = generate(_mask(), load_checkpoint(path), steps=2, seed=4, device="cpu", particle_contrast=given)
    np.testing.assert_array_equal(layer.data, expected)
    assert not np.array_equal(layer.data, drawn)
    viewer.add_image(np.zeros((8, 8)), name="small")
    widget.particle_contrast.setCurrentText("small")
    layers = len(viewer.layers)
    widget.generate_button.click()
    (refusal,) = notifications()
    assert refusal.severity == NotificationSeverity.ERROR
    assert all(word in refusal.message for word in ("'small'", "'cells'", "(16, 24)"))
    assert len(viewer.layers) == layers and widget.generate_button.isEnabled() and not widget.job.running
