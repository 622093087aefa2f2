"""EMA arithmetic: half-life in images, ramp-up, independence of the batch size, wrappers, the image counter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from training.ema import Ema, ema_beta, unwrap


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    model.register_buffer("counter", torch.zeros(()))
    return model


class _CompiledLike(nn.Module):
    """What ``torch.compile`` returns, as far as names go: the model under ``_orig_mod`` (compiling takes seconds)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._orig_mod = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._orig_mod(x)


@pytest.mark.parametrize("batch_images", [1, 4, 16, 64])
def test_the_past_halves_every_half_life_whatever_the_batch_size(batch_images: int) -> None:
    beta = ema_beta(batch_images, images_seen=10**9, half_life_images=64, rampup_ratio=None)
    assert beta ** (64 / batch_images) == pytest.approx(0.5, rel=1e-12)


def test_ramp_up_shortens_the_half_life_early_on() -> None:
    assert ema_beta(8, images_seen=0, half_life_images=1000, rampup_ratio=0.05) == 0.0  # first step: copy
    assert ema_beta(8, images_seen=400, half_life_images=1000, rampup_ratio=0.05) == pytest.approx(0.5 ** (8 / 20))
    assert ema_beta(8, images_seen=10**6, half_life_images=1000, rampup_ratio=0.05) == pytest.approx(0.5 ** (8 / 1000))
    assert ema_beta(8, images_seen=0, half_life_images=1000, rampup_ratio=None) == pytest.approx(0.5 ** (8 / 1000))


@pytest.mark.parametrize("batch_images", [2, 8, 64])
def test_the_average_after_n_images_does_not_depend_on_the_batch_size(batch_images: int) -> None:
    ema = Ema(_scalar_model(0.0), half_life_images=32, rampup_ratio=None)
    target = _scalar_model(1.0)
    for _ in range(128 // batch_images):
        ema.update(target, batch_images)
    # After 128 images = 4 half-lives, 1/16 of the initial 0 remains.
    assert ema.module.weight.item() == pytest.approx(1 - 0.5**4, rel=1e-6)
    assert ema.images_seen == 128


def test_update_blends_parameters_copies_buffers_and_returns_beta() -> None:
    ema = Ema(_scalar_model(2.0), half_life_images=10, rampup_ratio=None)
    target = _scalar_model(-1.0)
    target.counter.fill_(7.0)
    beta = ema.update(target, 10)
    assert beta == pytest.approx(0.5)
    assert ema.module.weight.item() == pytest.approx(0.5 * 2.0 + 0.5 * -1.0)
    assert ema.module.counter.item() == 7.0
    assert not ema.module.weight.requires_grad


def test_skip_counts_images_without_changing_the_average() -> None:
    ema = Ema(_scalar_model(3.0), half_life_images=10, rampup_ratio=0.5)
    ema.skip(16)
    assert ema.images_seen == 16
    assert ema.module.weight.item() == 3.0
    assert ema.update(_scalar_model(0.0), 4) == pytest.approx(0.5 ** (4 / 8))  # the ramp-up counts the skipped images


def test_state_uses_plain_names_inside_wrappers_and_restores_the_counter() -> None:
    model = _scalar_model(1.0)
    compiled = _CompiledLike(model)
    assert "_orig_mod.weight" in compiled.state_dict()
    assert unwrap(compiled) is model
    ema = Ema(compiled, half_life_images=10, rampup_ratio=0.1)
    ema.update(compiled, 5)
    assert sorted(ema.state_dict()) == ["counter", "weight"]
    restored = Ema(_scalar_model(0.0), half_life_images=10, rampup_ratio=0.1)
    restored.load_state_dict(ema.state_dict(), ema.images_seen)
    assert restored.images_seen == 5
    assert restored.module.weight.item() == ema.module.weight.item()
    # The next step continues the ramp-up where the saved run stopped.
    assert restored.update(model, 5) == pytest.approx(0.5 ** (5 / 0.5)) == ema.update(model, 5)


def test_beta_is_a_valid_decay_for_any_batch() -> None:
    for batch in (1, 3, 1000):
        beta = ema_beta(batch, images_seen=5000, half_life_images=500, rampup_ratio=0.05)
        assert 0 < beta < 1 and math.isfinite(beta)
