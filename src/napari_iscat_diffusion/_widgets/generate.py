"""The Generate dock widget: a synthetic iSCAT image for the chosen mask layer."""

from __future__ import annotations

import napari
import numpy as np
import torch
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..diffusion import GenerationProgress, LoadedModel, check_mask
from ..diffusion.particle_contrast import check_given_contrasts
from ..iscat.masks import random_mask
from ..synthetic import SamplerSettings, Synthesis, contrast_limits, provenance, synthesize
from ._controls import CheckpointChooser, LayerPicker, RunControls, SamplerControls, parse_proportions
from ._job import Job, Outcome, Report

# The contrast picker's choice of no layer: each particle's contrast is drawn from the model's distribution.
DRAWN_CONTRASTS = "drawn from the model"

OUT_OF_MEMORY = (
    "The GPU ran out of memory. Generate fewer samples at once, use a smaller mask, choose precision bf16 or fp16, "
    "or choose the cpu device."
)


class GenerateWidget(QWidget):
    """Mask layer, checkpoint and sampler settings in; a ``synthetic (mask name)`` Image layer out."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.mask_layer = LayerPicker(napari_viewer)
        self.new_mask = QPushButton("New mask")
        self.new_mask.setToolTip("Add an empty Labels layer of the size below to paint particles into")
        self.mask_height = QSpinBox(minimum=8, maximum=8192, value=256)
        self.mask_width = QSpinBox(minimum=8, maximum=8192, value=256)
        self.random_particles = QPushButton("Random particles")
        self.random_particles.setToolTip("Fill the chosen Labels layer with random particles")
        self.particle_count = QSpinBox(minimum=1, maximum=10000, value=30)
        self.proportions = QLineEdit("1")
        self.proportions.setToolTip("Relative frequency of classes 1..K, for example 0.5, 0.3, 0.2")
        self.checkpoint = CheckpointChooser()
        self.sampler = SamplerControls()
        self.particle_contrast = LayerPicker(napari_viewer, (napari.layers.Image,), none_text=DRAWN_CONTRASTS)
        self.particle_contrast.setToolTip(
            "For models with a contrast channel: an Image layer of the mask's shape whose value of largest "
            "magnitude over each particle is its peak contrast (the images' units); NaN there, or no layer, "
            "draws one from the model's distribution for the particle's class"
        )
        self.checkpoint.changed.connect(self._use_model)
        self._use_model()
        self.samples = QSpinBox(minimum=1, maximum=64, value=1)
        self.show_steps = QCheckBox("show denoising steps")
        self.generate_button = QPushButton("Generate")
        self._controls = [
            self.mask_layer,
            self.new_mask,
            self.random_particles,
            self.checkpoint,
            self.sampler,
            self.samples,
            self.show_steps,
            self.generate_button,
        ]
        self.run_controls = RunControls(
            self.generate_button, self._controls, step_format="{text}: step {completed} of {total}"
        )
        self.cancel_button = self.run_controls.cancel_button
        self.progress_bar = self.run_controls.progress_bar
        self.status = self.run_controls.status
        self._layout()
        self.new_mask.clicked.connect(self.add_new_mask)
        self.random_particles.clicked.connect(self.fill_random_particles)
        self.generate_button.clicked.connect(self.start)

    @property
    def job(self) -> Job | None:
        """The latest generation job, or None before the first."""
        return self.run_controls.job

    def _layout(self) -> None:
        size = QHBoxLayout()
        for widget in (self.mask_height, QLabel("x"), self.mask_width, self.new_mask):
            size.addWidget(widget)
        particles = QHBoxLayout()
        for widget in (self.particle_count, self.proportions, self.random_particles):
            particles.addWidget(widget)
        form = QFormLayout()
        form.addRow("Mask", self.mask_layer)
        form.addRow("Size (H x W)", size)
        form.addRow("Particles, classes", particles)
        form.addRow(self.checkpoint)
        form.addRow(self.sampler)
        form.addRow("Particle contrast", self.particle_contrast)
        form.addRow("Samples", self.samples)
        form.addRow(self.show_steps)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.run_controls)
        layout.addStretch()

    def _use_model(self) -> None:
        model = self.checkpoint.model
        self.sampler.use_model_defaults(model)
        # Not among the run's controls (which re-enable every control after a run): a run reads it when it starts.
        self.particle_contrast.setEnabled(model is not None and model.config.particle_contrast is not None)

    # --- masks ---------------------------------------------------------------------------------------------

    def add_new_mask(self) -> None:
        """Add an empty Labels layer of the chosen size and pick it."""
        shape = (self.mask_height.value(), self.mask_width.value())
        layer = self.viewer.add_labels(np.zeros(shape, np.uint8), name="mask")
        self.mask_layer.setCurrentText(layer.name)

    def fill_random_particles(self) -> None:
        """Fill the chosen Labels layer (its current plane for a stack) with random particles."""
        layer = self.mask_layer.layer()
        if not isinstance(layer, napari.layers.Labels):
            show_warning("Choose a Labels layer first, or click 'New mask' to add one.")
            return
        plane = self._shown_plane(layer)
        if plane is None:
            show_warning(f"'{layer.name}' has no plane at the position shown; move the slider onto one of its planes.")
            return
        try:
            proportions = parse_proportions(self.proportions.text())
            radius = 3.0
            rng = np.random.default_rng(self.sampler.seed.value())
            plane_shape = layer.data.shape[-2:]
            drawn = random_mask(
                plane_shape,
                self.particle_count.value(),
                min_distance=2 * radius + 2,
                class_proportions=proportions,
                radius=radius,
                rng=rng,
            ).mask
        except ValueError as error:
            show_error(f"Random particles: {error}")
            return
        # Widened when the drawn labels do not fit (label 300 in a uint8 layer would be stored as 44).
        data = np.array(layer.data, dtype=np.promote_types(layer.data.dtype, drawn.dtype))
        data[(*plane, ...)] = drawn
        layer.data = data

    def _shown_plane(self, layer: napari.layers.Labels) -> tuple[int, ...] | None:
        """The index of the plane of ``layer`` that the viewer shows, or None when it shows none of its planes."""
        # Layers are aligned on their last axes, and the viewer may have more axes, or longer ones, than the layer.
        leading = np.round(layer.world_to_data(self.viewer.dims.point)[:-2]).astype(int)
        if np.any(leading < 0) or np.any(leading >= layer.data.shape[:-2]):
            return None
        return tuple(int(index) for index in leading)

    def _mask_data(self) -> tuple[napari.layers.Labels, np.ndarray] | None:
        """The chosen mask layer and its data, or None after telling the user what is wrong."""
        layer = self.mask_layer.layer()
        model = self.checkpoint.model
        if layer is None:
            show_warning("No mask: click 'New mask' (then paint or add random particles) or open a Labels layer.")
        elif isinstance(layer, napari.layers.Image):
            show_error(
                f"'{layer.name}' is an Image layer, not a mask. Convert it (right-click > Convert to Labels) "
                "or choose a Labels layer."
            )
        elif not isinstance(layer, napari.layers.Labels):
            show_error(f"'{layer.name}' is not a Labels layer; choose a mask.")
        elif layer.data.ndim not in (2, 3):
            show_error(
                f"'{layer.name}' has {layer.data.ndim} dimensions; masks must be 2-D (H, W) or 3-D (Z or T, H, W). "
                "Take a 2-D or 3-D slice of it first."
            )
        elif model is None:
            show_error("No model loaded: choose a checkpoint (Browse... for a .safetensors file).")
        else:
            data = np.asarray(layer.data)
            try:
                check_mask(data, model.config.num_classes, name=f"'{layer.name}'")
            except ValueError as error:
                show_error(str(error))
                return None
            return layer, data
        return None

    # --- generation ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Check the inputs and start generating in a thread worker."""
        if self.run_controls.running:
            return
        chosen = self._mask_data()
        if chosen is None:
            return
        layer, mask = chosen
        model = self.checkpoint.model
        prior = model.config.particle_contrast
        contrast_layer = None if prior is None else self.particle_contrast.layer()
        contrasts = None if contrast_layer is None else np.asarray(contrast_layer.data)
        contrast_source = None if prior is None else DRAWN_CONTRASTS if contrast_layer is None else contrast_layer.name
        contrast_name = f"Particle contrast '{contrast_source}' (for the mask '{layer.name}')"
        try:
            settings = self.sampler.settings().resolved(model)
            if contrasts is not None:  # checked here too, so that a bad layer is refused before a thread starts
                check_given_contrasts(
                    contrasts, mask.shape if mask.ndim == 3 else (1, *mask.shape), prior, contrast_name
                )
        except ValueError as error:
            show_error(str(error))
            return
        samples, keep_steps = self.samples.value(), self.show_steps.isChecked()
        planes = 1 if mask.ndim == 2 else len(mask)

        def work(report: Report) -> Synthesis:
            def callback(progress: GenerationProgress) -> bool:
                first = progress.image_indices.start
                text = f"image {first + 1} of {planes * samples}" if planes * samples > 1 else "generating"
                return report(progress.completed, progress.total, text)

            return synthesize(
                mask,
                model,
                settings,
                samples=samples,
                keep_steps=keep_steps,
                callback=callback,
                should_stop=report.stop_requested,
                name=layer.name,
                particle_contrast=contrasts,
                contrast_name=contrast_name,
            )

        self.run_controls.start(
            work,
            description=f"synthetic ({layer.name})",
            status="Generating...",
            on_done=lambda outcome: self._done(outcome, layer, model, settings, contrast_source),
        )

    def cancel(self) -> None:
        """Stop before the next tile or sampler step; no layer is added."""
        self.run_controls.cancel()

    def _done(
        self,
        outcome: Outcome,
        layer: napari.layers.Labels,
        model: LoadedModel,
        settings: SamplerSettings,
        contrast_source: str | None,
    ) -> None:
        if torch.cuda.is_available():  # generate() frees its cache too; this also covers errors raised before it
            torch.cuda.empty_cache()
        if outcome.cancelled:
            self.status.setText("Cancelled; no layer added.")
            self.progress_bar.setValue(0)
        elif outcome.error is not None:
            self.status.setText("Failed.")
            error = outcome.error
            show_error(OUT_OF_MEMORY if isinstance(error, torch.OutOfMemoryError) else f"Generation failed: {error}")
        else:
            self._add_layers(outcome.value, layer, model, settings, contrast_source)
            self.status.setText("Done.")

    def _add_layers(
        self,
        result: Synthesis,
        layer: napari.layers.Labels,
        model: LoadedModel,
        settings: SamplerSettings,
        contrast_source: str | None,
    ) -> None:
        images = result.images
        extra = images.ndim - layer.data.ndim  # leading samples axis and channel axis
        scale = (1.0,) * extra + tuple(layer.scale)
        translate = (0.0,) * extra + tuple(layer.translate)
        units = ("pixel",) * extra + tuple(str(unit) for unit in layer.units)
        metadata = provenance(model, settings, seed=settings.seed, source=layer.name)
        metadata["samples"] = self.samples.value()  # sample s of plane p has seed + s * planes + p
        if contrast_source is not None:
            metadata["particle_contrast"] = contrast_source
        self.viewer.add_image(
            images,
            name=f"synthetic ({layer.name})",
            scale=scale,
            translate=translate,
            units=units,
            contrast_limits=contrast_limits(images),
            colormap="gray",
            metadata=metadata,
        )
        if result.denoising_steps is not None:
            steps = result.denoising_steps
            pad = steps.ndim - 2
            self.viewer.add_image(
                steps,
                name=f"denoising steps ({layer.name})",
                scale=(1.0,) * pad + tuple(layer.scale[-2:]),
                translate=(0.0,) * pad + tuple(layer.translate[-2:]),
                units=("pixel",) * pad + units[-2:],
                contrast_limits=contrast_limits(steps[-1]),
                colormap="gray",
                metadata=metadata,
            )
