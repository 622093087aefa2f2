"""On a CUDA device: generation agrees with the CPU's, bf16 stays close to fp32, seeds and tiles behave as on the
CPU, and a tiny training run trains and exports on the GPU. Skipped where torch sees no CUDA device (CI); run on
a GPU machine with ``bash .ci/gpu_session``."""

import json

import numpy as np
import pytest
import torch
from tests.tiny_models import save_tiny_checkpoint
from tests.tiny_training import run_python, tiny_overrides

from napari_iscat_diffusion.diffusion import generate, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny perturbed model (its output depends on its input) with guidance 1.5 by default."""
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_tiny_checkpoint(path, perturbed=True, config_fields={"default_guidance": 1.5})
    return load_checkpoint(path)


def _masks(n=3, size=48):
    rng = np.random.default_rng(0)
    masks = np.zeros((n, size, size), np.uint8)
    for mask in masks:
        for row, col in rng.integers(4, size - 8, (5, 2)):
            mask[row : row + 4, col : col + 4] = rng.integers(1, 3)
    return masks


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "ddpm", "heun"])
def test_cuda_in_fp32_gives_the_cpu_image(model, sampler):
    masks = _masks()
    # Every sampler draws its noise from CPU generators, so the same seed gives the same image on both devices.
    cpu = generate(masks, model, sampler=sampler, steps=6, seed=3, device="cpu", precision="fp32")
    torch.cuda.reset_peak_memory_stats()
    cuda = generate(masks, model, sampler=sampler, steps=6, seed=3, device="cuda", precision="fp32")
    assert torch.cuda.max_memory_allocated() > 0  # it did run on the GPU
    # cuDNN runs fp32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32): a 10-bit mantissa.
    assert _relative_error(cuda, cpu) < 2e-2


def test_bf16_on_cuda_stays_close_to_fp32(model):
    masks = _masks()
    fp32 = generate(masks, model, steps=6, seed=1, device="cuda", precision="fp32")
    bf16 = generate(masks, model, steps=6, seed=1, device="cuda", precision="bf16")
    assert np.isfinite(bf16).all()
    assert np.corrcoef(bf16.ravel(), fp32.ravel())[0, 1] > 0.99
    assert not np.array_equal(bf16, fp32)  # bf16 really ran


def test_the_same_seed_gives_the_same_image_whatever_the_batch_size_on_cuda(model):
    masks = _masks(4)
    together = generate(masks, model, steps=4, seed=5, batch_size=4, device="cuda", precision="fp32")
    one_by_one = generate(masks, model, steps=4, seed=5, batch_size=1, device="cuda", precision="fp32")
    # cuDNN may pick other (TF32) kernels for another batch size: equal to its rounding, far from another image's.
    np.testing.assert_allclose(together, one_by_one, rtol=0, atol=1e-2 * np.abs(together).max())
    assert not np.allclose(together[0], together[1])


def test_tiled_generation_on_cuda_matches_the_cpu(model):
    mask = _masks(1, size=96)[0]
    cpu = generate(mask, model, steps=3, seed=2, device="cpu", precision="fp32", tile_size=48)
    cuda = generate(mask, model, steps=3, seed=2, device="cuda", precision="fp32", tile_size=48)
    assert _relative_error(cuda, cpu) < 2e-2  # TF32 convolutions, as above


def test_a_tiny_run_trains_on_cuda_and_its_export_generates(tmp_path):
    export = tmp_path / "model.safetensors"
    result = run_python(
        ["-m", "training.train", *tiny_overrides(tmp_path / "run", "train.device=cuda", f"export.path={export}")],
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses and all(np.isfinite(losses))
    image = generate(_masks(1)[0], load_checkpoint(export), steps=2, device="cuda")
    assert image.shape == (48, 48) and np.isfinite(image).all()
