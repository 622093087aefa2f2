"""The conditional U-Net: shapes, initialisation, conditioning paths, config and input validation."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.tiny_models import tiny_unet_config

from napari_iscat_diffusion.diffusion import load_checkpoint
from napari_iscat_diffusion.diffusion.unet import ConditionalUNet, Downsample, SelfAttention, UNetConfig


def tiny_config(**overrides) -> UNetConfig:
    return tiny_unet_config(**{"num_classes": 3, **overrides})


def make_inputs(config: UNetConfig, n: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.image_channels, height, width, generator=generator)
    t = torch.rand(n, generator=generator) * 999
    cond = torch.rand(n, config.num_classes + 1, height, width, generator=generator)
    return x, t, cond


def perturbed(net: ConditionalUNet) -> ConditionalUNet:
    """The network with a random output convolution, so that its output is no longer zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        net.conv_out.weight.normal_(std=0.1)
        net.conv_out.bias.normal_(std=0.1)
    return net.eval()


@pytest.fixture(scope="module")
def tiny_net() -> ConditionalUNet:
    torch.manual_seed(0)
    return perturbed(ConditionalUNet(tiny_config()))


@pytest.mark.parametrize("size", [(1, 1), (2, 1), (7, 13), (33, 65)])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"image_channels": 3}, {"num_classes": 4}, {"channel_mults": (1, 2, 2), "attention_levels": (0, 2)}],
)
def test_output_shape_for_any_size(size, overrides):
    config = tiny_config(**overrides)
    net = ConditionalUNet(config)
    x, t, cond = make_inputs(config, 2, *size)
    with torch.no_grad():
        out = net(x, t, cond)
    assert out.shape == x.shape


def test_untrained_output_is_exactly_zero():
    config = tiny_config()
    x, t, cond = make_inputs(config, 2, 12, 10)
    with torch.no_grad():
        out = ConditionalUNet(config)(x, t, cond)
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_condition_and_timestep(tiny_net):
    x, t, cond = make_inputs(tiny_net.config, 1, 16, 16)
    with torch.no_grad():
        reference = tiny_net(x, t, cond)
        other_cond = tiny_net(x, t, torch.zeros_like(cond))
        other_t = tiny_net(x, t + 100, cond)
    assert reference.abs().max() > 0
    assert (reference - other_cond).abs().max() > 1e-4
    assert (reference - other_t).abs().max() > 1e-4


def test_batch_images_are_processed_independently(tiny_net):
    x, t, cond = make_inputs(tiny_net.config, 2, 13, 9)
    with torch.no_grad():
        batched = tiny_net(x, t, cond)
        alone = tiny_net(x[:1], t[:1], cond[:1])
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)


def test_gradients_reach_the_input_convolution():
    net = perturbed(ConditionalUNet(tiny_config())).train()
    x, t, cond = make_inputs(net.config, 2, 8, 8)
    net(x, t, cond).square().mean().backward()
    assert net.conv_in.weight.grad.abs().max() > 0
    assert net.time_mlp[0].weight.grad.abs().max() > 0


@pytest.mark.parametrize(
    ("mults", "levels", "expected"),
    [
        # per listed level: num_res_blocks down + (num_res_blocks + 1) up; + 1 in the middle for the deepest level
        ((1, 2), (1,), 1 + 2 + 1),
        ((1, 2), (0,), 1 + 2),
        ((1, 2, 2), (0, 2), (1 + 2) + (1 + 2 + 1)),
        ((1, 2), (), 0),
    ],
)
def test_attention_only_at_requested_levels(mults, levels, expected):
    net = ConditionalUNet(tiny_config(channel_mults=mults, attention_levels=levels))
    assert sum(isinstance(module, SelfAttention) for module in net.modules()) == expected
    for index, level in enumerate(net.down):
        has_attention = any(block.attention is not None for block in level.blocks)
        assert has_attention == (index in levels)


def test_blur_kernel_is_a_buffer_outside_the_state_dict():
    net = ConditionalUNet(tiny_config(antialias=True))
    downsamples = [module for module in net.modules() if isinstance(module, Downsample)]
    assert len(downsamples) == 1 and downsamples[0].blur_kernel is not None
    assert not any("blur" in key for key in net.state_dict())
    assert not any("blur" in name for name, _ in net.named_parameters())
    plain = ConditionalUNet(tiny_config(antialias=False))
    assert net.state_dict().keys() == plain.state_dict().keys()


def test_config_round_trip_through_json():
    config = tiny_config(image_channels=2, num_classes=5, dropout=0.1, antialias=False)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["channel_mults"] == [1, 2]
    restored = UNetConfig.from_dict(data)
    assert restored == config
    assert isinstance(restored.channel_mults, tuple) and isinstance(restored.attention_levels, tuple)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown key.*'channels'"):
        UNetConfig.from_dict({**tiny_config().to_dict(), "channels": 4})


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"base_channels": 0}, "base_channels: must be a positive integer"),
        ({"num_classes": 2.5}, "num_classes: must be a positive integer"),
        ({"image_channels": True}, "image_channels: must be a positive integer"),
        ({"channel_mults": ()}, "channel_mults: must list at least one"),
        ({"channel_mults": (1, 0)}, "channel_mults: must be a positive integer"),
        ({"channel_mults": "12"}, "channel_mults: must be a list of integers"),
        ({"attention_levels": (2,)}, r"attention_levels: level 2 is out of range.*indices 0\.\.1"),
        ({"attention_levels": (1, 1)}, "attention_levels: contains duplicates"),
        ({"dropout": 1.0}, r"dropout: must be a number in \[0, 1\)"),
        ({"antialias": "yes"}, "antialias: must be true or false"),
        ({"norm_groups": 3}, "norm_groups: 3 does not divide the 8 channels of level 0"),
        ({"num_heads": 3}, "num_heads: 3 does not divide the 16 channels of attention level 1"),
    ],
)
def test_invalid_config_values_raise(overrides, phrase):
    with pytest.raises(ValueError, match=phrase):
        UNetConfig.from_dict({**tiny_config().to_dict(), **overrides})


@pytest.mark.parametrize(
    ("shapes", "phrase"),
    [
        (((1, 2, 8, 8), (1,), (1, 4, 8, 8)), r"x must have shape \(N, 1, H, W\).*got \(1, 2, 8, 8\)"),
        (((1, 8, 8), (1,), (1, 4, 8, 8)), r"x must have shape \(N, 1, H, W\)"),
        (((1, 1, 8, 8), (1,), (1, 3, 8, 8)), r"cond must have shape \(1, 4, 8, 8\).*3 class channels"),
        (((2, 1, 8, 8), (2,), (1, 4, 8, 8)), r"cond must have shape \(2, 4, 8, 8\)"),
        (((1, 1, 8, 8), (1,), (1, 4, 8, 9)), r"cond must have shape \(1, 4, 8, 8\).*got \(1, 4, 8, 9\)"),
        (((2, 1, 8, 8), (), (2, 4, 8, 8)), r"t must have shape \(2,\)"),
    ],
)
def test_wrong_inputs_raise_helpful_errors(tiny_net, shapes, phrase):
    x_shape, t_shape, cond_shape = shapes
    with pytest.raises(ValueError, match=phrase):
        tiny_net(torch.zeros(x_shape), torch.zeros(t_shape), torch.zeros(cond_shape))


REFERENCE = Path(__file__).parent / "data" / "unet_reference"


@pytest.mark.parametrize("grad", [False, True])
def test_a_checkpoint_saved_before_the_performance_work_gives_the_same_outputs(grad):
    # tiny.safetensors and its inputs/outputs were written with the U-Net of commit 6b1232a (before the
    # channels-last inference layout); attention at the first and last level and the blur are covered.
    model = load_checkpoint(REFERENCE / "tiny.safetensors")
    io = load_file(REFERENCE / "io.safetensors")
    with torch.set_grad_enabled(grad):
        out = model.net(io["x"], io["t"], io["cond"])
    torch.testing.assert_close(out, io["output"], atol=1e-5, rtol=1e-5)


def test_default_model_parameter_names_and_shapes_are_unchanged():
    # The bundled default model was trained with these names; a rename would stop it loading.
    reference = json.loads((REFERENCE / "default_model_state_dict.json").read_text())
    net = ConditionalUNet(UNetConfig.from_dict(reference["unet"]))
    assert {name: list(t.shape) for name, t in net.state_dict().items()} == reference["state_dict_shapes"]
