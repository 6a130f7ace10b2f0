"""The SD1.x KL autoencoder (the VAE), built from a diffusers `vae/config.json`.

Attribute names equal diffusers' `AutoencoderKL` state-dict keys. Only the deterministic parts
are here: `encode` returns the Gaussian's mean and log-variance (sampling is the caller's), and
`decode` maps latents already divided by `scaling_factor` back to images in about [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.models.common import ConfigBase, Conv2d, Downsample2D, Linear, ResnetBlock2D, Upsample2D, group_norm, linears

_EPS = 1e-6  # every VAE norm uses this eps; diffusers' config has no field for it


@dataclass(frozen=True)
class VAEConfig(ConfigBase):
    """The fields of diffusers' AutoencoderKL config that SD1.x uses; defaults are SD1.5's."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    force_upcast: bool = True  # the SD1.5 VAE can overflow in fp16; a hint for the caller
    act_fn: str = "silu"

    _FIXED = {
        "act_fn": ("silu",),
        "shift_factor": (None, 0, 0.0),
        "latents_mean": (None,),
        "latents_std": (None,),
        "use_quant_conv": (True,),
        "use_post_quant_conv": (True,),
        "mid_block_add_attention": (True,),
    }

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"down_block_types={self.down_block_types}: only DownEncoderBlock2D is supported")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"up_block_types={self.up_block_types}: only UpDecoderBlock2D is supported")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (supported: 'silu')")


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own GroupNorm and a residual.

    diffusers builds it with head_dim = channels, i.e. one head of 512 in SD1.5.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])  # diffusers' to_out.1 is a dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = group_norm(self.group_norm, x)
        h = h.view(B, C, H * W).transpose(1, 2)  # [B, tokens, C]
        q, k, v = (t[:, None] for t in linears(h, (self.to_q, self.to_k, self.to_v)))  # [B, 1, tokens, C]; one matmul where the ops can
        o = ops.attention(q, k, v, C**-0.5)[:, 0]  # [B, tokens, C]
        o = self.to_out[0](o)
        return o.transpose(1, 2).reshape(B, C, H, W) + x


class UNetMidBlock2D(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, _EPS), ResnetBlock2D(ch, ch, None, groups, _EPS)])
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, _EPS) for j in range(layers))
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch, padding=0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, last: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, _EPS) for j in range(layers))
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> Gaussian moments [B, 2 * latent, H / f, W / f] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i == n - 1) for i in range(n)
        )
        self.mid_block = UNetMidBlock2D(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True))


class Decoder(nn.Module):
    """Latents [B, latent, h, w] (after post_quant_conv) -> image [B, 3, h * f, w * f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        rev = ch[::-1]
        self.conv_in = Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(ch[-1], g)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i == n - 1) for i in range(n)
        )
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=_EPS)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(group_norm(self.conv_norm_out, x, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] -> (mean, logvar) of the latent Gaussian (unscaled).

        logvar is clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does.
        """
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)  # 2 x [B, latent, h, w]
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents already divided by `config.scaling_factor` -> image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Same as `decode` (the network SD inference runs; also what ONNX export traces)."""
        return self.decode(z)
