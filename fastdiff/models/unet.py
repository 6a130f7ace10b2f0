"""The SD1.x denoising UNet, built from a diffusers `unet/config.json`.

Attribute names equal diffusers' `UNet2DConditionModel` state-dict keys, so its checkpoint loads
with `strict=True`. No buffers: the timestep frequencies are computed in forward, so the module
can be built on the meta device and loaded with `assign=True`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdiff import ops
from fastdiff.models.common import ConfigBase, Conv2d, Downsample2D, Linear, ResnetBlock2D, Upsample2D, group_norm, linears, per_block

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class UNetConfig(ConfigBase):
    """The fields of diffusers' UNet2DConditionModel config that SD1.x uses; defaults are SD1.5's.

    `attention_head_dim` is, in SD1.x configs, the number of heads (a historical diffusers
    naming slip); `num_attention_heads`, when given, takes precedence. Either may be an int or
    one value per block.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    transformer_layers_per_block: int = 1
    act_fn: str = "silu"

    _FIXED = {
        "act_fn": ("silu",),
        "mid_block_type": ("UNetMidBlock2DCrossAttn",),
        "center_input_sample": (False,),
        "only_cross_attention": (False,),
        "mid_block_only_cross_attention": (None, False),
        "dual_cross_attention": (False,),
        "upcast_attention": (False, None),
        "class_embed_type": (None,),
        "num_class_embeds": (None,),
        "class_embeddings_concat": (False,),
        "projection_class_embeddings_input_dim": (None,),
        "addition_embed_type": (None,),
        "addition_time_embed_dim": (None,),
        "encoder_hid_dim": (None,),
        "encoder_hid_dim_type": (None,),
        "time_embedding_type": ("positional",),
        "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,),
        "timestep_post_act": (None,),
        "time_cond_proj_dim": (None,),
        "resnet_time_scale_shift": ("default",),
        "resnet_skip_time_act": (False,),
        "resnet_out_scale_factor": (1, 1.0),
        "mid_block_scale_factor": (1, 1.0),
        "conv_in_kernel": (3,),
        "conv_out_kernel": (3,),
        "attention_type": ("default",),
        "cross_attention_norm": (None,),
        "reverse_transformer_layers_per_block": (None,),
    }

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"down block type {t!r} is not supported (supported: {', '.join(_DOWN_TYPES)})")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"up block type {t!r} is not supported (supported: {', '.join(_UP_TYPES)})")
        if not isinstance(self.layers_per_block, int):
            raise ValueError("layers_per_block must be an int (per-block lists are not supported)")
        if not isinstance(self.transformer_layers_per_block, int):
            raise ValueError("transformer_layers_per_block must be an int (per-block lists are not supported)")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} is not supported (supported: 'silu')")
        for c, heads in zip(self.block_out_channels, self.heads):
            if c % heads:
                raise ValueError(f"{c} channels do not split into {heads} attention heads")
        per_block(self.cross_attention_dim, n, "cross_attention_dim")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (see the class docstring about `attention_head_dim`)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_block(heads, len(self.block_out_channels), "attention heads")

    @property
    def context_dims(self) -> tuple[int, ...]:
        return per_block(self.cross_attention_dim, len(self.block_out_channels), "cross_attention_dim")


# ----------------------------------------------------------------------------------------------
# attention


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None (keys to_q/to_k/to_v/to_out.0)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        context_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])  # diffusers' to_out.1 is a dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of x to itself or to `context`, plus `residual` when given."""
        B, N, C = x.shape
        if context is None:  # q, k and v of x as one matmul where the ops can
            q, k, v = linears(x, (self.to_q, self.to_k, self.to_v))
        else:  # k and v of the text: the same at every step, computed once where the ops can
            q = self.to_q(x)
            k, v = linears(context, (self.to_k, self.to_v), reuse=True)
        q = q.view(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, N, d]
        k = k.view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, M, d]
        v = v.view(B, -1, self.heads, self.head_dim).transpose(1, 2)  # [B, heads, M, d]
        o = ops.attention(q, k, v, self.scale)  # [B, heads, N, d]
        o = o.transpose(1, 2).reshape(B, N, C)  # [B, N, heads * d]
        return self.to_out[0](o, residual)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_geglu(x, self.proj.weight, self.proj.bias)


class FeedForward(nn.Module):
    """GEGLU MLP; `net` indices match diffusers' keys (net.0.proj, net.2; net.1 is a dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self.net[2](self.net[0](x), residual)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(_ln(self.norm1, x), residual=x)  # x + attn1(norm1(x)), the add fused where it can be
        x = self.attn2(_ln(self.norm2, x), context, residual=x)
        return self.ff(_ln(self.norm3, x), residual=x)


def _ln(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


class Transformer2DModel(nn.Module):
    """GroupNorm, project to tokens, transformer blocks, project back, add the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, layers: int, linear_proj: bool):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: Linear(channels, channels)) if linear_proj else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(channels, heads, context_dim) for _ in range(layers))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = group_norm(self.norm, x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, tokens, C]
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.view(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W] (channels-last strides)
        if not self.linear_proj:
            h = self.proj_out(h)
        return h + x


# ----------------------------------------------------------------------------------------------
# UNet blocks


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (cross_attn=True) or DownBlock2D: resnets (+ transformers), then a
    stride-2 conv. Returns the output and every intermediate state for the skip connections."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, out_ch: int, temb_ch: int, cross_attn: bool, last: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_ch, g, eps) for j in range(n))
        self.attentions = None
        if cross_attn:
            self.attentions = nn.ModuleList(
                Transformer2DModel(out_ch, cfg.heads[i], cfg.context_dims[i], g, cfg.transformer_layers_per_block, cfg.use_linear_projection)
                for _ in range(n)
            )
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])

    def forward(self, x, temb, context):
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb[resnet])
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            states.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (cross_attn=True) or UpBlock2D: each resnet takes the previous output
    concatenated with one skip state; then a 2x upsampling unless it is the last block."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, prev_ch: int, out_ch: int, temb_ch: int, cross_attn: bool, last: bool):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        n = cfg.layers_per_block + 1
        resnets = []
        for j in range(n):
            skip_ch = in_ch if j == n - 1 else out_ch
            resnets.append(ResnetBlock2D((prev_ch if j == 0 else out_ch) + skip_ch, out_ch, temb_ch, g, eps))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = None
        if cross_attn:
            heads, context_dim = cfg.heads[::-1][i], cfg.context_dims[::-1][i]
            self.attentions = nn.ModuleList(
                Transformer2DModel(out_ch, heads, context_dim, g, cfg.transformer_layers_per_block, cfg.use_linear_projection)
                for _ in range(n)
            )
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x, skips, temb, context, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - j]], dim=1), temb[resnet])  # skips are used last-first
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, cfg: UNetConfig, ch: int, temb_ch: int):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_ch, g, eps), ResnetBlock2D(ch, ch, temb_ch, g, eps)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(ch, cfg.heads[-1], cfg.context_dims[-1], g, cfg.transformer_layers_per_block, cfg.use_linear_projection)]
        )

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb[self.resnets[0]])
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb[self.resnets[1]])


class TimestepEmbedding(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.linear_1 = Linear(in_ch, out_ch)
        self.linear_2 = Linear(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(ops.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------
# the UNet


class UNet2DConditionModel(nn.Module):
    """Predicts the noise in `sample` at `timestep`, conditioned on the text states."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        temb_ch = 4 * ch[0]
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)

        n = len(ch)
        self.down_blocks = nn.ModuleList(
            DownBlock(cfg, i, ch[max(i - 1, 0)], ch[i], temb_ch, t == "CrossAttnDownBlock2D", i == n - 1)
            for i, t in enumerate(cfg.down_block_types)
        )
        self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], temb_ch)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(
            UpBlock(cfg, i, rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb_ch, t == "CrossAttnUpBlock2D", i == n - 1)
            for i, t in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        # the resnets, each with its time_emb_proj (a plain list: no second set of state-dict keys)
        self.time_resnets = [m for m in self.modules() if isinstance(m, ResnetBlock2D)]

    def time_proj(self, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Sinusoidal timestep features [B, ch0] (diffusers' `Timesteps`).

        The angles t * freq are computed in float32 (in fp16 t=999 has a spacing of 0.5, a
        large phase error), then cast to the model's dtype for the MLP.
        """
        half = self.config.block_out_channels[0] // 2
        t = timestep.reshape(-1).expand(batch).float()  # [B]; a 0-dim or [1] timestep is shared
        exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - self.config.freq_shift))
        angles = t[:, None] * torch.exp(exponent)[None, :]  # [B, half]
        sin, cos = torch.sin(angles), torch.cos(angles)
        emb = torch.cat([cos, sin] if self.config.flip_sin_to_cos else [sin, cos], dim=-1)
        return emb.to(self.time_embedding.linear_1.weight.dtype)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample [B, C, h, w], timestep (number, 0-dim or [B] tensor), encoder_hidden_states [B, 77, D]."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        temb = self.time_embedding(self.time_proj(timestep, sample.shape[0]))
        temb = ops.silu(temb)  # every resnet applies SiLU to the embedding first: do it once
        projected = linears(temb, [r.time_emb_proj for r in self.time_resnets])  # and its time_emb_proj: all as one matmul where the ops can
        temb = dict(zip(self.time_resnets, projected))
        context = encoder_hidden_states

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, states = block(x, temb, context)
            skips.extend(states)

        x = self.mid_block(x, temb, context)

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[-2:] if skips else None  # matters for odd latent sizes
            x = block(x, block_skips, temb, context, upsample_size)

        x = group_norm(self.conv_norm_out, x, silu=True)
        return self.conv_out(x)
