"""Blocks shared by the UNet and the VAE, and the config loading both use.

Module attribute names equal diffusers' checkpoint keys (`norm1`, `conv1`, `time_emb_proj`,
`downsamplers.0.conv`, ...), so a diffusers state dict loads with `strict=True`. The norm modules
only hold parameters: forward calls `fastdiff.ops`, fusing GroupNorm + SiLU where the network
has that pair.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.weights import read_config

# ----------------------------------------------------------------------------------------------
# configs


class ConfigBase:
    """`from_dict` / `from_json` for the frozen dataclass configs.

    Keys that are not fields are ignored (`_class_name`, `_diffusers_version`, settings that only
    matter for training such as dropout), except those in `_FIXED`: the values that change the
    network and that we do not implement. For those any other value raises ValueError, rather
    than silently building the wrong network.
    """

    _FIXED: dict = {}  # config key -> tuple of accepted values (a list value: every item accepted)

    @classmethod
    def from_dict(cls, d: dict):
        for key, accepted in cls._FIXED.items():
            if key in d and not _accepted(d[key], accepted):
                raise ValueError(
                    f"{cls.__name__}: {key}={d[key]!r} is not supported (supported: {' or '.join(map(repr, accepted))})"
                )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _freeze(v) for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_config(path))


def _accepted(value, accepted: tuple) -> bool:
    if isinstance(value, (list, tuple)):
        return all(v in accepted for v in value)
    return value in accepted


def _freeze(v):
    """JSON lists -> tuples, so configs stay hashable and immutable."""
    return tuple(_freeze(x) for x in v) if isinstance(v, list) else v


def per_block(value, n: int, name: str) -> tuple:
    """An int-or-list config value as one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


# ----------------------------------------------------------------------------------------------
# blocks


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and keys) whose forward goes through the ops seam. Dilation 1
    and one group only: the networks use nothing else."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x), plus `residual` when given (fused into the convolution where it can be)."""
        return ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, residual)


class Linear(nn.Linear):
    """nn.Linear (same parameters and keys) whose forward goes through the ops seam."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """linear(x), plus `residual` when given (fused into the matmul where it can be)."""
        return ops.linear(x, self.weight, self.bias, residual)


def linears(x: torch.Tensor, modules, reuse: bool = False) -> tuple:
    """Each of `modules` (nn.Linear) applied to the one input `x`, as one matmul where the ops can
    (`ops.linear_split`; `reuse` for an input that repeats, the text's embeddings)."""
    return ops.linear_split(x, tuple(m.weight for m in modules), tuple(m.bias for m in modules), reuse)


def group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """Run an nn.GroupNorm's parameters through the ops seam (optionally fused with SiLU)."""
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu)


class ResnetBlock2D(nn.Module):
    """GN-SiLU-conv, (+ time embedding), GN-SiLU-conv, plus a (1x1-projected) skip.

    `temb_channels=None` builds the VAE variant without `time_emb_proj`. The UNet passes the
    time embedding already through SiLU and `time_emb_proj` (every block applies SiLU to the same
    tensor, so the UNet does it once, and all blocks' projections as one matmul where the ops can).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """`temb`: the time embedding through SiLU and already through this block's `time_emb_proj`
        [B, C] (the UNet projects for all blocks at once)."""
        h = self.conv1(group_norm(self.norm1, x, silu=True))
        if temb is not None:
            h = h + temb[:, :, None, None]  # [B, C, 1, 1]
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return self.conv2(group_norm(self.norm2, h, silu=True), residual=x)  # dropout is identity at inference


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 (the VAE) pads right/bottom by one, as the checkpoints expect."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv.

    `size` (the skip connection's spatial size) is only used when it is not exactly twice the
    input, i.e. for latents whose sides are not multiples of 2**num_downsamples.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        return ops.upsample_conv(x, self.conv.weight, self.conv.bias, size)
