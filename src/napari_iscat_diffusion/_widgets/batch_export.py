"""The Batch export dock widget: synthetic image/mask pairs written to a folder, driven by ``export.export_pairs``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import napari
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..export import (
    ExportProgress,
    ExportSummary,
    MaskItem,
    export_pairs,
    masks_from_arrays,
    masks_from_folder,
    random_masks,
)
from ._controls import CheckpointChooser, LayerPicker, RunControls, SamplerControls, parse_proportions
from ._job import Job, Outcome, Report

SOURCES = ("Labels layer", "Folder of mask TIFFs", "Random masks")


class BatchExportWidget(QWidget):
    """Masks (a layer, a folder or random) in; ``images/``, ``masks/`` and ``manifest.csv`` in a folder out."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.source = QComboBox()
        self.source.addItems(SOURCES)
        self.mask_layer = LayerPicker(napari_viewer)
        self.mask_folder = QLineEdit()
        self.mask_folder_button = QPushButton("...")
        self.random_count = QSpinBox(minimum=1, maximum=1_000_000, value=10)
        self.random_height = QSpinBox(minimum=8, maximum=8192, value=256)
        self.random_width = QSpinBox(minimum=8, maximum=8192, value=256)
        self.random_particles = QSpinBox(minimum=0, maximum=10000, value=20)
        self.random_proportions = QLineEdit("1")
        self.output = QLineEdit()
        self.output_button = QPushButton("...")
        self.samples = QSpinBox(minimum=1, maximum=1000, value=1)
        self.checkpoint = CheckpointChooser()
        self.sampler = SamplerControls()
        self.checkpoint.changed.connect(lambda: self.sampler.use_model_defaults(self.checkpoint.model))
        self.sampler.use_model_defaults(self.checkpoint.model)
        self.export_button = QPushButton("Export")
        self._controls = [
            self.source,
            self.mask_layer,
            self.mask_folder,
            self.mask_folder_button,
            self.random_count,
            self.random_height,
            self.random_width,
            self.random_particles,
            self.random_proportions,
            self.output,
            self.output_button,
            self.samples,
            self.checkpoint,
            self.sampler,
            self.export_button,
        ]
        self.run_controls = RunControls(self.export_button, self._controls)
        self.cancel_button = self.run_controls.cancel_button
        self.progress_bar = self.run_controls.progress_bar
        self.status = self.run_controls.status
        self._layout()
        self.mask_folder_button.clicked.connect(lambda: self._browse(self.mask_folder, "Folder of mask TIFFs"))
        self.output_button.clicked.connect(lambda: self._browse(self.output, "Output folder"))
        self.export_button.clicked.connect(self.start)

    @property
    def job(self) -> Job | None:
        """The latest export job, or None before the first."""
        return self.run_controls.job

    def _layout(self) -> None:
        def row(*widgets: QWidget) -> QHBoxLayout:
            box = QHBoxLayout()
            for widget in widgets:
                box.addWidget(widget)
            return box

        form = QFormLayout()
        form.addRow("Masks from", self.source)
        form.addRow("Labels layer", self.mask_layer)
        form.addRow("Mask folder", row(self.mask_folder, self.mask_folder_button))
        form.addRow("Random masks", row(self.random_count, QLabel("of"), self.random_height, self.random_width))
        form.addRow("Particles, classes", row(self.random_particles, self.random_proportions))
        form.addRow("Output folder", row(self.output, self.output_button))
        form.addRow("Samples per mask", self.samples)
        form.addRow(self.checkpoint)
        form.addRow(self.sampler)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_controls)
        layout.addStretch()

    def _browse(self, field: QLineEdit, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, field.text())
        if folder:
            field.setText(folder)

    def _masks(self) -> Sequence[MaskItem]:
        """The masks from the chosen source (folder and random masks are made one at a time during the export);
        raises ValueError with a message for the user."""
        source = self.source.currentText()
        if source == SOURCES[0]:
            layer = self.mask_layer.layer()
            if not isinstance(layer, napari.layers.Labels):
                raise ValueError("choose a Labels layer as the mask source (an Image layer is not a mask)")
            return masks_from_arrays({layer.name: layer.data})
        if source == SOURCES[1]:
            if not self.mask_folder.text():
                raise ValueError("choose the folder of mask TIFFs")
            return masks_from_folder(Path(self.mask_folder.text()))
        proportions = parse_proportions(self.random_proportions.text())
        return random_masks(
            self.random_count.value(),
            (self.random_height.value(), self.random_width.value()),
            particles=self.random_particles.value(),
            class_proportions=proportions,
            seed=self.sampler.seed.value(),
        )

    def start(self) -> None:
        """Check the inputs and start the export in a thread worker."""
        if self.run_controls.running:
            return
        model = self.checkpoint.model
        if model is None:
            show_error("No model loaded: choose a checkpoint (Browse... for a .safetensors file).")
            return
        if not self.output.text():
            show_error("Choose an output folder.")
            return
        try:
            masks = self._masks()
            settings = self.sampler.settings().resolved(model)
        except ValueError as error:
            show_error(f"Batch export: {error}")
            return
        folder, samples = Path(self.output.text()), self.samples.value()

        def work(report: Report) -> ExportSummary:
            def callback(progress: ExportProgress) -> bool:
                # progress counts pairs; within a pair, the fraction of sampler steps done
                completed = progress.pairs_done * progress.steps + progress.step
                text = f"pair {progress.pairs_done + 1} of {progress.pairs_total} ({progress.current})"
                return report(completed, progress.pairs_total * progress.steps, text)

            return export_pairs(
                masks,
                model,
                folder,
                settings,
                samples_per_mask=samples,
                callback=callback,
                should_stop=report.stop_requested,
            )

        self.run_controls.start(work, description="batch export", status="Exporting...", on_done=self._done)

    def cancel(self) -> None:
        """Stop before the next tile or sampler step; finished pairs stay, a later run resumes."""
        self.run_controls.cancel()

    def _done(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.status.setText("Failed.")
            show_error(f"Batch export failed: {outcome.error}")
            return
        summary: ExportSummary | None = outcome.value
        if outcome.cancelled or summary is None or summary.cancelled:
            written = 0 if summary is None else summary.written
            self.status.setText(f"Cancelled after {written} new pair(s); export again into the folder to resume.")
            return
        self.status.setText(
            f"Wrote {summary.written} pair(s), skipped {summary.skipped} finished, in {summary.folder}."
        )
        show_info(self.status.text())
