"""Form controls shared by the dock widgets: a layer picker, the checkpoint chooser, the sampler settings and the
run controls (start and Cancel buttons, progress bar, status line)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import napari
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..diffusion import SAMPLERS, CheckpointError, LoadedModel, SamplingCancelled, available_devices, load_checkpoint
from ..diffusion.generate import PRECISIONS
from ..diffusion.guidance import format_class_guidance, parse_class_guidance
from ..diffusion.samplers import DEFAULT_SAMPLER
from ..models import bundled_checkpoints
from ..synthetic import SamplerSettings
from ._job import Job, Outcome, Report

BROWSE = "Browse..."
MAX_SEED = 2**31 - 1


def parse_proportions(text: str) -> list[float]:
    """Class proportions typed as numbers separated by commas or spaces; ValueError with an example otherwise."""
    try:
        proportions = [float(p) for p in text.replace(",", " ").split()]
    except ValueError:
        proportions = []
    if not proportions:
        raise ValueError(f"class proportions must be numbers such as '0.5, 0.3, 0.2' (classes 1, 2, 3), got {text!r}")
    return proportions


class LayerPicker(QComboBox):
    """Layers of the viewer of some kinds, in that order of kinds (by default Labels, then Image layers, so that a
    mask opened as an image gets a clear message); with ``none_text`` that choice first, meaning no layer."""

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        kinds: tuple[type, ...] = (napari.layers.Labels, napari.layers.Image),
        none_text: str | None = None,
    ) -> None:
        super().__init__()
        self._viewer = viewer
        self._kinds = kinds
        self._none_text = none_text
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.reordered):
            event.connect(self.refresh)
        viewer.layers.events.inserted.connect(lambda event: event.value.events.name.connect(self.refresh))
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def refresh(self, _event: object = None) -> None:
        """Rebuild the list from the viewer's layers, keeping the current choice when it still exists."""
        current = self.currentText()
        names = [layer.name for kind in self._kinds for layer in self._viewer.layers if isinstance(layer, kind)]
        if self._none_text is not None:
            names.insert(0, self._none_text)
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        self.blockSignals(False)
        if current in names:
            self.setCurrentText(current)

    def layer(self) -> napari.layers.Layer | None:
        """The chosen layer, or None when there is none (or the no-layer choice is made)."""
        if self.currentIndex() == 0 and self._none_text is not None:
            return None
        name = self.currentText()
        return next((layer for layer in self._viewer.layers if layer.name == name), None)


class CheckpointChooser(QWidget):
    """Bundled checkpoints by name plus Browse...; loads the chosen one once and keeps it until the choice changes."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self._paths: dict[str, Path] = dict(bundled_checkpoints())
        self._model: LoadedModel | None = None
        self._loaded_from: Path | None = None
        self.combo = QComboBox()
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.PlainText)  # class names come from the file: never HTML
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow("Checkpoint", self.combo)
        layout.addRow(self.summary)
        self._fill()
        self.combo.activated.connect(self._chosen)
        self._load_current()

    @property
    def model(self) -> LoadedModel | None:
        """The loaded model, or None when no usable checkpoint is chosen."""
        return self._model

    def set_path(self, path: str | Path) -> None:
        """Choose a checkpoint file (what Browse... does after its dialog)."""
        path = Path(path)
        self._paths[path.name] = path
        self._fill()
        self.combo.setCurrentText(path.name)
        self._load_current()

    def _fill(self) -> None:
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems([*self._paths, BROWSE])
        self.combo.blockSignals(False)

    def _chosen(self, _index: int) -> None:
        if self.combo.currentText() != BROWSE:
            self._load_current()
            return
        path, _ = QFileDialog.getOpenFileName(self, "Choose a model checkpoint", "", "Checkpoints (*.safetensors)")
        if path:
            self.set_path(path)
        else:  # dialog cancelled: go back to the model in use
            self.combo.setCurrentText(self._loaded_from.name if self._loaded_from else BROWSE)

    def _load_current(self) -> None:
        path = self._paths.get(self.combo.currentText())
        if path is None:
            self._model, self._loaded_from = None, None
            self.summary.setText("No bundled model; choose Browse... to load a .safetensors checkpoint.")
        elif path != self._loaded_from:
            try:
                self._model, self._loaded_from = load_checkpoint(path), path
                self.summary.setText(self._model.summary())
            except CheckpointError as error:
                self._model, self._loaded_from = None, None
                self.summary.setText("No model loaded.")
                show_error(str(error))
        else:  # the model in use was chosen again: keep the settings the user has made for it
            return
        self.changed.emit()


class SamplerControls(QWidget):
    """Sampler with its default steps, guidance and per-class guidance, seed with a random button, device and
    precision."""

    def __init__(self) -> None:
        super().__init__()
        self.sampler = QComboBox()
        for index, (name, info) in enumerate(SAMPLERS.items()):
            self.sampler.addItem(info.label, name)
            self.sampler.setItemData(index, info.description, Qt.ItemDataRole.ToolTipRole)
        self.sampler.setCurrentIndex(list(SAMPLERS).index(DEFAULT_SAMPLER))
        self.steps = QSpinBox(minimum=1, maximum=1000)
        self.guidance = QDoubleSpinBox(minimum=0.0, maximum=20.0, singleStep=0.25, decimals=2, value=1.0)
        self.class_guidance = QLineEdit()
        self.class_guidance.setPlaceholderText("none: Guidance everywhere")
        self.class_guidance.setToolTip(
            "Guidance around the particles of single classes, as label=scale pairs such as 1=1.0, 3=2.0; "
            "everything else uses Guidance. Choosing a model fills in its calibrated values."
        )
        self.seed = QSpinBox(minimum=0, maximum=MAX_SEED)
        self.random_seed = QPushButton("random")
        self.random_seed.clicked.connect(lambda: self.seed.setValue(random.randint(0, MAX_SEED)))
        self.device = QComboBox()
        self.device.addItems(available_devices())
        self.precision = QComboBox()
        self.precision.addItems(PRECISIONS)
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.random_seed)
        layout = QFormLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addRow("Sampler", self.sampler)
        layout.addRow("Steps", self.steps)
        layout.addRow("Guidance", self.guidance)
        layout.addRow("Class guidance", self.class_guidance)
        layout.addRow("Seed", seed_row)
        layout.addRow("Device", self.device)
        layout.addRow("Precision", self.precision)
        self._model: LoadedModel | None = None
        self.sampler.currentIndexChanged.connect(self._default_steps)
        self._default_steps()

    def _default_steps(self, _index: int = 0) -> None:
        name = self.sampler.currentData()
        self.steps.setValue(SAMPLERS[name].default_steps if self._model is None else self._model.default_steps(name))

    def use_model_defaults(self, model: LoadedModel | None) -> None:
        """Show the model's default sampler with its default steps, guidance and per-class guidance."""
        if model is not None:
            self._model = model
            self.sampler.setCurrentIndex(self.sampler.findData(model.default_sampler))
            self._default_steps()
            self.guidance.setValue(model.config.default_guidance)
            self.class_guidance.setText(format_class_guidance(model.config.default_class_guidance))

    def settings(self) -> SamplerSettings:
        """The chosen settings; ValueError (saying what is wrong) for unreadable class guidance."""
        return SamplerSettings(
            sampler=self.sampler.currentData(),
            steps=self.steps.value(),
            guidance=self.guidance.value(),
            class_guidance=parse_class_guidance(self.class_guidance.text()),
            seed=self.seed.value(),
            device=self.device.currentText(),
            precision=self.precision.currentText(),
        )


class RunControls(QWidget):
    """The start and Cancel buttons, a progress bar and a status line for one Job at a time.

    While the job runs, the given form controls are disabled and only Cancel is enabled. ``step_format``
    turns a step report into the status line; its fields are ``text``, ``completed`` and ``total``.
    """

    def __init__(self, start_button: QPushButton, controls: list[QWidget], *, step_format: str = "{text}") -> None:
        super().__init__()
        self.job: Job | None = None
        self._controls = controls
        self._step_format = step_format
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setTextFormat(Qt.TextFormat.PlainText)  # messages name the user's files and layers
        buttons = QHBoxLayout()
        buttons.addWidget(start_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        self.cancel_button.clicked.connect(self.cancel)

    @property
    def running(self) -> bool:
        """True while a job's worker is running."""
        return self.job is not None and self.job.running

    def start(
        self, work: Callable[[Report], Any], *, description: str, status: str, on_done: Callable[[Outcome], None]
    ) -> None:
        """Lock the form and run ``work`` as a Job that stops by raising SamplingCancelled.

        ``on_done(outcome)`` runs on the main thread once the form is unlocked again.
        """
        self._set_running(True)
        self.progress_bar.setValue(0)  # an empty bar from the start, not the last run's until the first step
        self.status.setText(status)

        def done(outcome: Outcome) -> None:
            self._set_running(False)
            on_done(outcome)

        self.job = Job(
            work, description=description, cancel_exception=SamplingCancelled, on_step=self._step, on_done=done
        )

    def cancel(self) -> None:
        """Ask the running job to stop before its next tile or sampler step."""
        if self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling...")

    def _step(self, completed: int, total: int, text: str) -> None:
        # Job calls this before napari's progress update, whose nested event loop may deliver the end of the
        # job: the final status set in on_done then comes last and is not overwritten by this step.
        self.progress_bar.setMaximum(total)
        self.progress_bar.setValue(completed)
        self.status.setText(self._step_format.format(text=text, completed=completed, total=total))

    def _set_running(self, running: bool) -> None:
        for widget in self._controls:
            widget.setEnabled(not running)
        self.cancel_button.setEnabled(running)
