"""The training loop: DDP, EMA, warm-up + cosine learning rate, accumulation, clipping, validation,
sample grids, logs, resumable checkpoints and export.

The process group is initialised by the caller (``training/train.py``); with ``world_size == 1`` the
model is not wrapped. Every rank runs the same loop on its own shard of the data with its own noise
seed; collective calls (gradient all-reduce, metric all-reduce, RNG gathering) happen at the same
steps on every rank. Only rank 0 writes files, logs and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from napari_iscat_diffusion import png
from napari_iscat_diffusion.diffusion.conditioning import encode_condition, null_condition
from napari_iscat_diffusion.diffusion.generate import generate
from napari_iscat_diffusion.diffusion.loaded_model import LoadedModel
from napari_iscat_diffusion.diffusion.particle_contrast import ContrastPrior
from napari_iscat_diffusion.diffusion.schedules import schedule_from_config
from napari_iscat_diffusion.evaluation.plots import Panel, curves_figure, save_figure
from napari_iscat_diffusion.io.tiff_pairs import DataError

from .config import ConfigError, TrainConfig, build_model_config
from .datasets import IscatDataset
from .ema import Ema, unwrap
from .export import export_model
from .finetune import initial_contrast_prior
from .losses import diffusion_loss
from .normalization import RawImages, denormalize
from .particle_contrast import contrast_channel, measure_prior
from .spectral_density import spectral_density_range
from .state import (
    StateError,
    checksum,
    flatten_optimizer,
    list_states,
    load_newest,
    load_state,
    prefixed,
    prune_states,
    save_state,
    state_path,
    unflatten_optimizer,
    unprefixed,
)

log = logging.getLogger("training")

# Sporadic non-finite steps (a bf16 overflow now and then) are skipped. A run that has skipped more than
# train.max_nonfinite steps in all and more than this share of its steps is not learning: it stops too, even
# when the skipped steps are not in a row.
MAX_SKIPPED_SHARE = 0.01


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite for too many steps in a row."""


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier for 0-based optimiser step ``step``: linear warm-up, then cosine or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DataErrorOnEveryRank(DataError):
    """Bad data that every rank of a process group raises at the same point (``Trainer._stop_on_bad_data``)."""


def _data_batches(loader: DataLoader) -> Iterator[dict | DataError]:
    """The loader's batches; bad data, whether raised or handed out as the batch (``collate_items``), is yielded
    as its DataError, and ends the iteration."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except DataError as error:
            batch = error
        yield batch
        if isinstance(batch, DataError):
            return


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0]) % 2**63


class Trainer:
    """Trains a ``ConditionalUNet`` as ``config`` says.

    Args:
        model: the network, already on this rank's device (identical initial weights on every rank
            are not required: DDP broadcasts rank 0's).
        config: the training configuration.
        train_loader: batches of ``{"image", "labels", "has_mask"}`` (``IscatDataset`` items); its
            sampler should have ``set_position(items)`` (``data.InfiniteSampler``) so that a resumed
            run continues the data order.
        val_loader: a finite loader of validation batches (this rank's shard), the same every time.
        rank, world_size: this process's rank and the number of processes.
        pixel_size_nm, class_names: facts about the data stored in the exported model.

    The normalisation statistics are taken from ``train_loader.dataset.normalization``; where
    ``export.sampling_density_range`` is "auto", the spectral density range the sampler's grid is fitted to is
    measured on the same dataset's raw images (``spectral_density.spectral_density_range``).
    """

    # The clock of ``train.time_limit_minutes`` (seconds); tests replace it.
    _clock = staticmethod(time.monotonic)

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_loader: DataLoader,
        val_loader: DataLoader,
        rank: int = 0,
        world_size: int = 1,
        *,
        pixel_size_nm: float | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.net = unwrap(model)
        self.device = next(self.net.parameters()).device
        if self.net.config != config.unet_config():
            raise ConfigError("the model's architecture differs from the config's model section")
        self.model = model
        if world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.schedule = schedule_from_config(config.model.schedule)
        optim = config.optim
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, optim.warmup_steps, config.train.steps, optim.schedule, optim.min_lr_ratio),
        )
        self.ema = Ema(self.net, config.ema.half_life_images, config.ema.rampup_ratio)
        # One seed per rank: the global generator (dropout) and the one for timesteps, noise and
        # condition dropout; both are saved with the state.
        torch.manual_seed(_seed(config.seed, rank, 0))
        self.generator = torch.Generator(self.device).manual_seed(_seed(config.seed, rank, 1))
        self.batch_images = config.train.batch_size * config.train.grad_accum * world_size
        self.autocast = self._autocast(config.train.precision)
        normalization = train_loader.dataset.normalization
        self.model_config = build_model_config(
            config,
            normalization,
            pixel_size_nm=pixel_size_nm,
            class_names=class_names,
            measured_density_range=self._measured_density_range(train_loader.dataset, normalization),
            particle_contrast=self._measured_contrast_prior(train_loader, val_loader),
        )
        self.run_dir = Path(config.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.micro_batches = 0  # per rank: the position in the data order
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.best_val_loss = math.inf
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.last_val_loss: float | None = None
        self._writer = None

    # ----------------------------------------------------------------------------------------- setup

    def _autocast(self, precision: str) -> contextlib.AbstractContextManager:
        cuda = self.device.type == "cuda"
        if precision == "bf16" and not cuda:
            raise ConfigError("train.precision: bf16 autocast is for CUDA only; use 'auto' or 'fp32' on the CPU")
        if precision == "fp32" or not cuda:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _stop_on_bad_data(self, error: DataError | None) -> None:
        """Raise ``error``, or on every rank the first failing rank's, so that bad data stops all ranks together
        and none waits forever in a collective. Every rank calls it at the same point."""
        if self.world_size > 1:
            failed = self._all_reduce(torch.tensor([float(error is not None)], device=self.device))
            if not failed.item():
                return
            errors: list = [None] * self.world_size
            dist.all_gather_object(errors, None if error is None else (str(error.path), error.problem))
            raise DataErrorOnEveryRank(*next(found for found in errors if found is not None))
        if error is not None:
            raise error

    def _step_batches(self, batches: Iterator[dict | DataError]) -> list[dict]:
        """The ``train.grad_accum`` micro-batches of one optimiser step, read before any is used: the ranks agree
        that none holds bad data once per step, while the device is idle between steps."""
        step_batches, error = [], None
        for _ in range(self.config.train.grad_accum):
            batch = next(batches)
            if isinstance(batch, DataError):
                error = batch
                break
            step_batches.append(batch)
        self._stop_on_bad_data(error)
        return step_batches

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and conditions on the device; mask-free items get the null condition."""
        x0 = batch["image"].to(self.device, non_blocking=True)
        prior = self.model_config.particle_contrast
        contrast = None
        if prior is not None:
            # IscatDataset measures it in the loader's workers; other datasets' batches are measured here.
            contrast = batch.get("contrast")
            if contrast is None:
                pairs = zip(batch["image"], batch["labels"], strict=True)
                contrast = torch.stack([contrast_channel(image, labels, prior) for image, labels in pairs])
        cond = encode_condition(batch["labels"].to(self.device), self.net.config.num_classes, contrast=contrast)
        has_mask = torch.as_tensor(batch["has_mask"], device=self.device).view(-1, 1, 1, 1)
        return x0, torch.where(has_mask, cond, null_condition(cond))

    # ------------------------------------------------------------------------------------- training

    def fit(self) -> dict:
        """Train up to ``config.train.steps`` optimiser steps (from the resumed step), fewer where early stopping
        or ``train.time_limit_minutes`` ends the run; returns a summary.

        Raises NonFiniteLossError after ``train.max_nonfinite`` non-finite steps in a row, or more than that many
        in all where they are more than ``MAX_SKIPPED_SHARE`` of the steps; DataError on every rank when an item
        of any rank is bad.
        """
        config = self.config
        total = config.train.steps
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_position"):
            sampler.set_position(self.micro_batches * self.train_loader.batch_size)
        elif self.micro_batches:
            log.warning("the train loader's sampler cannot resume its position; the data order restarts")
        batches = _data_batches(self.train_loader)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._open_logs()
        sample_batch = self._sample_batch() if self.is_main and config.log.sample_every else None
        self._stop_on_bad_data(sample_batch if isinstance(sample_batch, DataError) else None)
        progress = self._progress(total)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        stopped_early = time_limit_reached = False
        limit = config.train.time_limit_minutes
        deadline = None if limit is None else self._clock() + 60.0 * limit
        try:
            while self.step < total:
                loss, grad_norm, finite = self._train_step(batches)
                self.step += 1
                if finite:
                    window_loss += loss
                    window_steps += 1
                lr = self.optimizer.param_groups[0]["lr"]  # the next step's rate
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if config.log.every and (self.step % config.log.every == 0 or self.step == total) and window_steps:
                    elapsed = time.perf_counter() - window_start
                    rate = window_steps * self.batch_images / max(elapsed, 1e-9)
                    self._log_train(window_loss / window_steps, lr, grad_norm, rate)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                improved = False
                if config.log.val_every and (self.step % config.log.val_every == 0 or self.step == total):
                    improved = self._run_validation()
                if sample_batch is not None and (self.step % config.log.sample_every == 0 or self.step == total):
                    self._write_samples(sample_batch)
                every = config.checkpoint.every
                if improved or self.step == total or (every and self.step % every == 0):
                    self.save()
                patience = config.train.early_stopping_patience
                if patience is not None and self.evals_since_best >= patience:
                    if self.is_main:
                        log.info("early stopping: no better validation loss in %d validations", patience)
                    self.save()
                    stopped_early = True
                    break
                if deadline is not None and self.step < total and self._past(deadline):
                    if self.is_main:
                        log.info("time limit: %g minutes of training reached at step %d", limit, self.step)
                    self.save()
                    time_limit_reached = True
                    break
        finally:
            if progress is not None:
                progress.close()
            if self.is_main:
                try:
                    self._write_plots()
                except Exception as error:  # a plot must never cost the run its export
                    log.warning("could not draw the metric plots: %s", error)
                if self._writer is not None:
                    self._writer.close()
        return self.summary(stopped_early=stopped_early, time_limit_reached=time_limit_reached)

    def _past(self, deadline: float) -> bool:
        """Whether any rank's clock has passed ``deadline`` (``_clock`` seconds): all ranks stop together."""
        late = torch.tensor([float(self._clock() >= deadline)], device=self.device)
        return bool(self._all_reduce(late).item() > 0)

    def _loss(self, model: torch.nn.Module, x0: torch.Tensor, cond: torch.Tensor, **sampling) -> torch.Tensor:
        """``diffusion_loss`` of ``model`` on ``x0`` with this run's loss weights; ``sampling`` names the
        condition dropout, generator and (for validation) timesteps, which differ between training and
        validation."""
        train = self.config.train
        return diffusion_loss(
            model,
            self.schedule,
            self.config.model.parameterization,
            x0,
            cond,
            min_snr_gamma=train.min_snr_gamma,
            min_snr_floor=train.min_snr_floor,
            particle_weight=train.particle_loss_weight,
            particle_radius_px=train.particle_loss_radius_px,
            **sampling,
        )

    def _train_step(self, batches) -> tuple[float, float, bool]:
        """One optimiser step over ``grad_accum`` micro-batches; returns (mean loss, grad norm, finite)."""
        train = self.config.train
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro, batch in enumerate(self._step_batches(batches)):
            self.micro_batches += 1
            x0, cond = self._inputs(batch)
            # Gradients are all-reduced only on the last micro-step: no_sync covers forward and backward.
            last = micro == train.grad_accum - 1
            sync = contextlib.nullcontext() if last or self.world_size == 1 else self.model.no_sync()
            with sync:
                with self.autocast:
                    loss = self._loss(
                        self.model, x0, cond, cond_drop_prob=train.cond_drop_prob, generator=self.generator
                    )
                (loss / train.grad_accum).backward()
            losses.append(loss.detach())
        max_norm = self.config.optim.grad_clip if self.config.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm)
        mean_loss = torch.stack(losses).mean()
        # All ranks agree to skip: a NaN on one rank counts for all.
        finite = torch.isfinite(mean_loss) & torch.isfinite(grad_norm)
        stats = torch.stack([torch.where(finite, mean_loss, 0.0), (~finite).float()]).to(torch.float64)
        stats = self._all_reduce(stats).tolist()
        if stats[1] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.skip(self.batch_images)
            with warnings.catch_warnings():
                # The schedule follows the step count, skipped steps included; torch warns when the
                # very first step is skipped, as if the optimiser step had been forgotten.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.is_main:
                log.warning("step %d: non-finite loss or gradient, step skipped", self.step + 1)
                self._record({"step": self.step + 1, "skipped": "non-finite loss or gradient"})
            too_many = self.nonfinite_total > max(train.max_nonfinite, MAX_SKIPPED_SHARE * (self.step + 1))
            if self.nonfinite_in_row >= train.max_nonfinite or too_many:
                raise NonFiniteLossError(
                    f"the loss or the gradients were NaN or infinite in {self.nonfinite_in_row} steps in a row and "
                    f"{self.nonfinite_total} of {self.step + 1} steps in all; lower optim.lr or use "
                    "train.precision=fp32, then resume from the last checkpoint"
                )
            return math.nan, math.nan, False
        self.nonfinite_in_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.net, self.batch_images)
        return stats[0] / self.world_size, float(grad_norm), True

    # ----------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validate(self) -> float:
        """EMA model's mean loss over this run's validation data, on ``log.val_timesteps`` evenly spaced
        timesteps with noise seeded per (rank, batch, timestep), so that values compare across steps."""
        config = self.config
        grid = torch.linspace(0, self.schedule.num_timesteps - 1, config.log.val_timesteps).round().long()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        error = None
        for b, batch in enumerate(_data_batches(self.val_loader)):
            if isinstance(batch, DataError):
                error = batch
                break
            x0, cond = self._inputs(batch)
            for j, t in enumerate(grid.tolist()):
                generator = torch.Generator(self.device).manual_seed(_seed(config.seed, self.rank, b, j, 2))
                with self.autocast:
                    loss = self._loss(
                        self.ema.module,
                        x0,
                        cond,
                        cond_drop_prob=0.0,
                        generator=generator,
                        timesteps=torch.full((len(x0),), t, device=self.device),
                    )
                totals += torch.stack([loss.double() * len(x0), torch.tensor(len(x0), device=self.device)])
        self._stop_on_bad_data(error)
        total, count = self._all_reduce(totals).tolist()
        return total / max(count, 1)

    def _run_validation(self) -> bool:
        """Validate, log, track the best; returns whether the loss improved."""
        value = self.validate()
        self.last_val_loss = value
        improved = value < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step, self.evals_since_best = value, self.step, 0
        else:
            self.evals_since_best += 1
        if self.is_main:
            self._record({"step": self.step, "val_loss": value})
            if self._writer is not None:
                self._writer.add_scalar("val/loss", value, self.step)
        return improved

    def _sample_batch(self) -> dict | DataError | None:
        """The first ``log.num_samples`` validation labels and images (physical units), fixed for the run; the
        DataError of a bad item among them."""
        labels, images = [], []
        for batch in _data_batches(self.val_loader):
            if isinstance(batch, DataError):
                return batch
            labels.append(batch["labels"])
            images.append(batch["image"])
            if sum(len(x) for x in labels) >= self.config.log.num_samples:
                break
        if not labels:
            return None
        count = self.config.log.num_samples
        normalization = self.model_config.normalization
        real = denormalize(torch.cat(images)[:count], normalization).numpy()
        return {"labels": torch.cat(labels)[:count].numpy(), "images": real}

    def _write_samples(self, sample_batch: dict) -> None:
        """A PNG grid (masks, EMA samples, real images) and a TensorBoard image."""
        log_config = self.config.log
        loaded = LoadedModel(net=self.ema.module, config=self.model_config, path=None, sha256="", versions={})
        samples = generate(
            sample_batch["labels"],
            loaded,
            sampler=log_config.sampler,
            steps=log_config.sample_steps,
            guidance=log_config.guidance,
            seed=self.config.seed,
            device=self.device,
            precision="auto",
        )
        if samples.ndim == 4:
            samples = samples[:, 0]
        real = sample_batch["images"][:, 0]
        low, high = np.percentile(real, [0.5, 99.5])
        classes = max(self.net.config.num_classes, 1)
        rows = [
            [png.to_uint8(m, 0, classes) for m in sample_batch["labels"]],
            [png.to_uint8(s, low, high) for s in samples],
            [png.to_uint8(r, low, high) for r in real],
        ]
        image = png.grid(rows)
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        png.write_png(folder / f"samples-{self.step:09d}.png", image)
        if self._writer is not None:
            self._writer.add_image("samples", image, self.step, dataformats="HW")

    # -------------------------------------------------------------------------------------- logging

    def _progress(self, total: int):
        if not (self.is_main and self.config.log.progress):
            return None
        return tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, desc="training")

    def _open_logs(self) -> None:
        """Drop logged lines beyond the resumed step and open TensorBoard (when installed)."""
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))
        if self.config.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed: no TensorBoard logs")
                return
            self._writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step or None)

    def _record(self, entry: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(entry) + "\n")

    def _log_train(self, loss: float, lr: float, grad_norm: float, rate: float) -> None:
        if not self.is_main:
            return
        entry = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": rate,
            "images_seen": self.ema.images_seen,
        }
        self._record(entry)
        if self._writer is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s"):
                self._writer.add_scalar(f"train/{key}", entry[key], self.step)

    def _write_plots(self) -> None:
        """loss.png (log scale, with validation as a second file), lr.png from metrics.jsonl."""
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return
        entries = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        for key, log_y in (("loss", True), ("val_loss", True), ("lr", False)):
            points = [{"step": e["step"], key: e[key]} for e in entries if key in e]
            if len(points) >= 2:
                panel = Panel(key, f"{key} (log scale)" if log_y else key, log_y=log_y)
                save_figure(curves_figure({key: points}, "step", [panel], columns=1), self.run_dir / f"{key}.png")

    # ---------------------------------------------------------------------------------- checkpoints

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state(), "noise": self.generator.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _weights_digest(self) -> str:
        """SHA-256 of this rank's model and EMA weights."""
        return checksum({**prefixed("model.", self.net.state_dict()), **prefixed("ema.", self.ema.state_dict())})

    def save(self) -> Path | None:
        """Write the resumable state (rank 0; every rank must call it: RNG states are gathered); returns the file.

        Every rank's weight digest is gathered too and stored in the state: ranks whose model or EMA
        weights differ mean that DDP lost sync, and the run stops with RuntimeError rather than train on.
        """
        mine = {"rng": {k: v.cpu() for k, v in self._rng_state().items()}, "weights": self._weights_digest()}
        gathered = [mine]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine)
        digests = [entry["weights"] for entry in gathered]
        if len(set(digests)) > 1:
            raise RuntimeError(
                f"step {self.step}: the {self.world_size} processes hold different weights (SHA-256 per rank: "
                f"{', '.join(d[:12] for d in digests)}); distributed training lost sync, please report this"
            )
        if not self.is_main:
            return None
        optim_tensors, optim_info = flatten_optimizer(self.optimizer.state_dict())
        tensors = {**prefixed("model.", self.net.state_dict()), **prefixed("ema.", self.ema.state_dict())}
        tensors.update(optim_tensors)
        for rank, entry in enumerate(gathered):
            tensors.update(prefixed(f"rng.{rank}.", entry["rng"]))
        info = {
            "step": self.step,
            "weight_digests": digests,
            "images_seen": self.ema.images_seen,
            "micro_batches": self.micro_batches,
            "world_size": self.world_size,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_step": self.best_step,
            "evals_since_best": self.evals_since_best,
            "last_val_loss": self.last_val_loss,
            "optimizer": optim_info,
            "scheduler": self.scheduler.state_dict(),
            "config": self.config.to_dict(),
        }
        path = state_path(self.checkpoint_dir, self.step)
        save_state(path, tensors, info)
        keep = {self.best_step} if self.best_step is not None else set()
        prune_states(self.checkpoint_dir, self.config.checkpoint.keep_last, keep)
        return path

    def resume(self, spec: str = "auto") -> Path | None:
        """Load a saved state: "auto" (the newest usable one in run_dir, else start fresh), "none", or a
        file. Returns the file loaded, or None. A damaged file is skipped with a warning under "auto";
        ConfigError when there are states but none is usable.

        Rank 0 chooses the file and every rank loads that one. Starting fresh ("none") or from a given
        file in a run_dir whose checkpoints go further raises ConfigError: the newer states would be
        taken for this run's by a restart and pruned in place of its own.
        """
        found = load_newest(self.checkpoint_dir) if spec == "auto" and self.is_main else None
        if found is not None:
            chosen: Path | None = found[0]
        elif spec in ("auto", "none"):
            chosen = None
        else:
            chosen = Path(spec)
        chosen = self._from_main(chosen)
        if chosen is None:
            damaged = list_states(self.checkpoint_dir)
            if spec == "auto" and damaged:
                # Starting over would write states among the damaged ones, and pruning could keep those.
                raise ConfigError(
                    f"checkpoint.resume=auto: none of the {len(damaged)} training states in {self.checkpoint_dir} "
                    "is usable (see the warnings); delete them or use a new run_dir"
                )
            self._refuse_newer_states(spec, 0)
            return None
        if found is not None:
            path, tensors, info = found
        else:
            path = chosen
            try:
                tensors, info = load_state(path)
            except StateError as err:
                raise ConfigError(f"checkpoint.resume: {err}") from err
        if spec != "auto":
            self._refuse_newer_states(spec, info["step"])
        if info.get("lr_scale", 1.0) != 1.0:
            raise ConfigError(
                f"checkpoint.resume: {path} was trained under the plateau learning-rate schedule, which this version "
                "no longer has; start a new run from its exported model instead (model.init_from)"
            )
        saved_unet = info["config"]["model"]
        current = self.config.to_dict()["model"]
        if {k: v for k, v in saved_unet.items() if k != "dropout"} != {
            k: v for k, v in current.items() if k != "dropout"
        }:
            raise ConfigError(f"checkpoint.resume: {path} was trained with a different model section: {saved_unet}")
        self.net.load_state_dict(unprefixed("model.", tensors))
        self.ema.load_state_dict(unprefixed("ema.", tensors), info["images_seen"])
        self.optimizer.load_state_dict(unflatten_optimizer(tensors, info["optimizer"]))
        self.scheduler.load_state_dict(info["scheduler"])
        self.step, self.micro_batches = info["step"], info["micro_batches"]
        self.nonfinite_in_row, self.evals_since_best = info["nonfinite_in_row"], info["evals_since_best"]
        self.nonfinite_total = info.get("nonfinite_total", self.nonfinite_in_row)  # older states lack it
        best = info["best_val_loss"]
        self.best_val_loss = math.inf if best is None else best
        self.best_step, self.last_val_loss = info["best_step"], info["last_val_loss"]
        rng = unprefixed(f"rng.{self.rank}.", tensors)
        if info["world_size"] != self.world_size or not rng:
            log.warning(
                "resuming with %d processes from a run with %d: random streams are re-seeded, the run is not "
                "bit-identical to an uninterrupted one",
                self.world_size,
                info["world_size"],
            )
            self.generator.manual_seed(_seed(self.config.seed, self.rank, 1, self.step))
        else:
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["noise"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)
        return path

    def _from_main(self, value: Path | None) -> Path | None:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _refuse_newer_states(self, spec: str, step: int) -> None:
        newer = [found for found, _ in list_states(self.checkpoint_dir) if found > step]
        if newer:
            raise ConfigError(
                f"checkpoint.resume={spec}: {self.checkpoint_dir} holds training states up to step {max(newer)} "
                f"beyond this run's start at step {step}; use a new run_dir, delete those states, or resume=auto"
            )

    # ------------------------------------------------------------------------------------------ export

    def summary(self, **extra) -> dict:
        """A JSON summary of the run (steps, images, losses, world size, config)."""
        return {
            "steps": self.step,
            "images_seen": self.ema.images_seen,
            "world_size": self.world_size,
            "batch_images": self.batch_images,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "best_step": self.best_step,
            "final_val_loss": self.last_val_loss,
            "config": self.config.to_dict(),
            **extra,
        }

    def _measured_density_range(self, dataset: RawImages, normalization: dict) -> tuple[float, float] | None:
        """The training images' spectral density range where ``export.sampling_density_range`` is "auto"
        (the normalisation's images and seed), else None; ConfigError when the images give none."""
        if self.config.export.sampling_density_range != "auto":
            return None
        try:
            measured = spectral_density_range(
                dataset, normalization, max_images=self.config.data.normalization_images, seed=self.config.seed
            )
        except ValueError as err:
            raise ConfigError(
                f"export.sampling_density_range: 'auto' cannot measure the training images ({err}); "
                "give [low, high] or null (the log-SNR grid)"
            ) from err
        if self.is_main:
            log.info("spectral density range of the training images: %g to %g (fits the sampler's grid)", *measured)
        return measured

    def _measured_contrast_prior(self, train_loader: DataLoader, val_loader: DataLoader) -> ContrastPrior | None:
        """For a network with ``model.contrast_channel``: the particles' peak-contrast distributions over the
        training set (the normalisation's number of images and seed; in the units of ``model.init_from``'s channel
        where it has one), handed to the loaders' datasets to measure the channel; else None. ConfigError when the
        images give none."""
        if not self.config.unet_config().contrast_channel:
            return None
        units = initial_contrast_prior(self.config) if self.config.model.init_from else None
        try:
            prior = measure_prior(train_loader.dataset, self.config.data.normalization_images, self.config.seed, units)
        except ValueError as err:
            raise ConfigError(f"model.contrast_channel: {err}") from err
        for loader in (train_loader, val_loader):
            if isinstance(loader.dataset, IscatDataset):
                loader.dataset.contrast_prior = prior
        if self.is_main:
            medians = {label: round(values[len(values) // 2], 3) for label, values in prior.quantiles.items()}
            log.info(
                "particles' median peak contrast per class (normalised units): %s; channel unit %.4g%s",
                medians,
                prior.scale,
                "" if units is None else f" (that of {self.config.model.init_from})",
            )
        return prior

    def export(self, path: str | Path | None = None) -> Path:
        """Write the EMA model for the plugin (rank 0's job); returns the file written."""
        target = Path(path or self.config.export.path or self.run_dir / "model.safetensors")
        target.parent.mkdir(parents=True, exist_ok=True)
        model_config = dataclasses.replace(self.model_config, training=self.summary())
        export_model(target, self.ema.module, model_config, fp16=self.config.export.fp16)
        return target
