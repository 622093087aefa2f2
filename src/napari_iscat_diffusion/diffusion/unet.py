"""A compact conditional U-Net for mask-conditioned diffusion of iSCAT images.

The layout follows guided-diffusion (ADM): residual blocks with FiLM time conditioning
("scale-shift norm"), self-attention at chosen resolutions, skip connections concatenated on the
way up. The condition (K one-hot class channels plus the "mask given" channel) is concatenated to
the noisy image at the input, so the mask reaches the network at full resolution, which is where
the small ring-shaped particle PSFs live.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# Upper bounds on the sizes in a UNetConfig, so that a config read from a file cannot ask for an absurd network
# (gigabytes of weights or millions of modules) before its weights are compared with it. Each is several times
# what a real iSCAT model needs (the bundled one: 32 base channels, 3 levels of at most 4x, 2 blocks, 3 classes):
# 1024 x 16 channels is beyond any GPU's memory at useful image sizes, 8 levels shrink 256 px to 2 px, and
# labels above 255 do not fit a uint8 mask.
UNET_LIMITS: dict[str, int] = {
    "image_channels": 64,
    "num_classes": 255,
    "base_channels": 1024,
    "num_res_blocks": 16,
    "num_heads": 64,
    "norm_groups": 1024,
}
MAX_LEVELS = 8  # entries of channel_mults
MAX_CHANNEL_MULT = 16


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of ``ConditionalUNet``; stored as JSON in checkpoints.

    Attributes:
        image_channels: C, channels of the image (1, or more for focal stacks).
        num_classes: K mask classes; the network input has C + K + 1 channels (C + K + 2 with ``contrast_channel``).
        base_channels: channels at the first resolution level.
        channel_mults: channel multiplier per resolution level; each level after the first halves H and W.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_levels: indices into ``channel_mults`` of the levels with self-attention; the
            bottleneck gets attention too when the deepest level is listed.
        num_heads: attention heads; must divide the channels of every attention level.
        dropout: dropout probability inside residual blocks.
        antialias: blur with a [1, 2, 1] binomial filter before each stride-2 downsampling.
        norm_groups: GroupNorm groups; must divide ``base_channels * m`` for every multiplier m.
        contrast_channel: one more condition channel, each particle's peak contrast (``particle_contrast``);
            the network input then has C + K + 2 channels.
    """

    image_channels: int = 1
    num_classes: int = 3
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    dropout: float = 0.0
    antialias: bool = True
    norm_groups: int = 32
    contrast_channel: bool = False

    def __post_init__(self) -> None:
        for name, limit in UNET_LIMITS.items():
            _check_positive_int(name, getattr(self, name), limit)
        # Lists (from JSON or a caller) become tuples so that the config stays hashable.
        object.__setattr__(self, "channel_mults", _int_tuple("channel_mults", self.channel_mults))
        object.__setattr__(self, "attention_levels", _int_tuple("attention_levels", self.attention_levels))
        if not 1 <= len(self.channel_mults) <= MAX_LEVELS:
            raise ValueError(
                f"channel_mults: must list at least one resolution level and at most {MAX_LEVELS}, "
                f"got {len(self.channel_mults)}"
            )
        for mult in self.channel_mults:
            _check_positive_int("channel_mults", mult, MAX_CHANNEL_MULT)
        num_levels = len(self.channel_mults)
        for level in self.attention_levels:
            if not 0 <= level < num_levels:
                raise ValueError(
                    f"attention_levels: level {level} is out of range; channel_mults has {num_levels} levels "
                    f"(indices 0..{num_levels - 1})"
                )
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels: contains duplicates: {reprlib.repr(self.attention_levels)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        for name in ("antialias", "contrast_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {reprlib.repr(getattr(self, name))}")
        # Every channel count in the network (concatenated skips included) is a sum of these, so
        # checking them here is enough for every GroupNorm.
        for level, mult in enumerate(self.channel_mults):
            channels = self.base_channels * mult
            if channels % self.norm_groups:
                raise ValueError(
                    f"norm_groups: {self.norm_groups} does not divide the {channels} channels of level {level} "
                    f"(base_channels={self.base_channels} x channel_mults[{level}]={mult}); choose a divisor"
                )
            if level in self.attention_levels and channels % self.num_heads:
                raise ValueError(
                    f"num_heads: {self.num_heads} does not divide the {channels} channels of attention level {level}"
                )

    @property
    def condition_channels(self) -> int:
        """Channels of the condition tensor: K one-hot classes, the "mask given" channel, and the contrast channel."""
        return self.num_classes + 1 + int(self.contrast_channel)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists; ``contrast_channel`` only where set, so that other
        files stay readable by versions that predate it)."""
        data = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}
        if not self.contrast_channel:
            del data["contrast_channel"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        """Build a config from ``to_dict`` output; missing keys take defaults, unknown keys raise ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"UNet config must be a dict, got {type(data).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"UNet config: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**data)


def _check_positive_int(name: str, value: object, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name}: must be a positive integer of at most {limit}, got {reprlib.repr(value)}")


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: must be a list of integers, got {reprlib.repr(value)}")
    if any(isinstance(item, bool) or not isinstance(item, int) for item in value):
        raise ValueError(f"{name}: must be a list of integers, got {reprlib.repr(value)}")
    return tuple(value)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (N, dim) of continuous timesteps t (N,); dim must be even.

    Computed in float32 whatever the dtype of t: in bf16 the phases ``t * freq`` for t near 1000
    would be off by whole radians.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    phases = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(phases), torch.sin(phases)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then FiLM from the time embedding, SiLU, dropout, conv; plus a skip path."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        # Unlike guided-diffusion, conv2 keeps its default initialisation: the zeroed output conv
        # already makes the untrained network output zero, and a live conv2 lets gradients reach
        # the FiLM (time) path from the first step.
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (N, in, H, W), emb (N, emb_channels) already passed through SiLU -> (N, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all pixels, pre-norm and residual; the identity at initialisation."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, C, H, W)."""
        n, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (N, H*W, C)
        # Head dim last and contiguous: the fused CPU/GPU attention kernels need it, otherwise
        # PyTorch falls back to the several times slower math path.
        q, k, v = self.qkv(tokens).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (N, H*W, C)
        return x + self.proj(out).transpose(1, 2).reshape(n, c, height, width)


class Block(nn.Module):
    """A residual block, followed by self-attention at the levels that have it."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, config: UNetConfig, attention: bool
    ) -> None:
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_channels, config.norm_groups, config.dropout)
        self.attention = SelfAttention(out_channels, config.num_heads, config.norm_groups) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x (N, in, H, W), emb (N, emb_channels) -> (N, out, H, W)."""
        h = self.res(x, emb)
        return self.attention(h) if self.attention is not None else h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, optionally after a [1, 2, 1] x [1, 2, 1] blur against aliasing."""

    def __init__(self, channels: int, antialias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        kernel = None
        if antialias:
            taps = torch.tensor([1.0, 2.0, 1.0])
            kernel = (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).contiguous()
        # A fixed filter: not trained and not saved, so checkpoints hold learned weights only.
        self.register_buffer("blur_kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) with even H, W -> (N, C, H/2, W/2)."""
        if self.blur_kernel is not None:
            # Replicate padding keeps the blurred border at the level of the image, not pulled to zero.
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.blur_kernel, groups=x.shape[1])
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) -> (N, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution level and the resampling after them (None at the end of the path)."""

    def __init__(self, blocks: list[Block], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class ConditionalUNet(nn.Module):
    """Predicts eps, v or x0 from a VP-scaled noisy image, a timestep and the mask condition.

    ``forward(x, t, cond)``: x (N, C, H, W), t (N,) continuous timesteps in [0, T - 1], cond
    (N, K + 1, H, W) -> (N, C, H, W). Any H and W work: the input is padded to a multiple of
    ``2 ** (len(channel_mults) - 1)`` and the output cropped back. The output convolution starts at
    zero, so an untrained network predicts exactly zero.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        base = config.base_channels
        emb_channels = 4 * base
        self.freq_channels = 2 * ((base + 1) // 2)  # the sinusoidal embedding needs an even size
        self.time_mlp = nn.Sequential(
            nn.Linear(self.freq_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.conv_in = nn.Conv2d(config.image_channels + config.condition_channels, base, 3, padding=1)

        last = len(config.channel_mults) - 1
        skip_channels = [base]
        channels = base
        self.down = nn.ModuleList()
        for level, mult in enumerate(config.channel_mults):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(Block(channels, base * mult, emb_channels, config, level in config.attention_levels))
                channels = base * mult
                skip_channels.append(channels)
            downsample = Downsample(channels, config.antialias) if level < last else None
            if downsample is not None:
                skip_channels.append(channels)
            self.down.append(Level(blocks, downsample))

        self.middle = nn.ModuleList(
            [
                Block(channels, channels, emb_channels, config, last in config.attention_levels),
                Block(channels, channels, emb_channels, config, False),
            ]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                in_channels = channels + skip_channels.pop()
                blocks.append(Block(in_channels, base * mult, emb_channels, config, level in config.attention_levels))
                channels = base * mult
            self.up.append(Level(blocks, Upsample(channels) if level > 0 else None))

        self.norm_out = nn.GroupNorm(config.norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, config.image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict (N, C, H, W) from x (N, C, H, W), t (N,) and cond (N, ``condition_channels``, H, W)."""
        self._check_inputs(x, t, cond)
        height, width = x.shape[-2:]
        h = _pad_to_multiple(torch.cat([x, cond.to(x.dtype)], dim=1), 2 ** (len(self.config.channel_mults) - 1))
        if not torch.is_grad_enabled() and h.device.type == "cpu":
            # oneDNN convolutions and GroupNorm run 10-20% faster on channels-last activations on the CPU
            # (docs/performance.md). Only the activations change layout, and only without autograd, so
            # weights, checkpoints and training stay as they were.
            h = h.contiguous(memory_format=torch.channels_last)

        emb = self.time_mlp(timestep_embedding(t, self.freq_channels).to(x.dtype))
        # Every FiLM projection starts with SiLU; applying it once here saves one per block.
        emb = F.silu(emb)

        h = self.conv_in(h)
        skips = [h]
        for level in self.down:
            for block in level.blocks:
                h = block(h, emb)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., :height, :width]

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> None:
        image_channels, cond_channels = self.config.image_channels, self.config.condition_channels
        if x.ndim != 4 or x.shape[1] != image_channels:
            raise ValueError(
                f"x must have shape (N, {image_channels}, H, W) (image_channels={image_channels}), got {tuple(x.shape)}"
            )
        n, _, height, width = x.shape
        expected_cond = (n, cond_channels, height, width)
        if tuple(cond.shape) != expected_cond:
            raise ValueError(
                f"cond must have shape {expected_cond} (N, H, W of x; {self.config.num_classes} class channels "
                f"plus the 'mask given' channel{' and the contrast channel' if self.config.contrast_channel else ''}), "
                f"got {tuple(cond.shape)}"
            )
        if tuple(t.shape) != (n,):
            raise ValueError(f"t must have shape ({n},), one timestep per image, got {tuple(t.shape)}")


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad H and W at the bottom and right up to a multiple; reflect where possible, replicate otherwise."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    # Reflection needs a pad smaller than the size; tiny inputs (say 1 pixel wide) fall back to replicate.
    if pad_w:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < width else "replicate")
    if pad_h:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < height else "replicate")
    return x
