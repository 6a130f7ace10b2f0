"""GroupNorm (+ optional SiLU) over [B, C, *] in NCHW or channels-last layout.

A (batch, group) pair alone gives only B * 32 = 64 programs at SD's batch 2, under half of an H200's
132 SMs, and the VAE decoder's full-resolution groups hold a million elements each. So each group's
spatial axis is split into SPLIT chunks and the work runs as two launches over (chunk, batch * group):

  1. `_group_norm_stats_kernel`: count, mean and M2 (sum of squared deviations) of each chunk,
     merged tile by tile with Chan's parallel formula.
  2. `_group_norm_apply_kernel`: merges the chunks' partials into the group's mean and variance,
     then writes (x - mean) * rstd * weight + bias, optionally through SiLU.

Large means (100 + randn) cost no precision: both kernels work on x - pivot, the pivot being the
group's first element, so fp32 sums never hold the big common offset; and each tile's M2 is taken
around the tile's own mean.

Tiles are [BLOCK_HW, BLOCK_C] with the spatial and channel strides passed in, so one kernel serves
both layouts: NCHW (spatial stride 1) and channels-last (channel stride 1). The output has the
input's memory format. Statistics are fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TILE = 2048  # elements per [BLOCK_HW, BLOCK_C] tile: 16 per thread at 4 warps
_NUM_WARPS = 4
_PROGRAMS_PER_SM = 4  # enough chunks to fill the GPU a few times over


@triton.jit
def _group_norm_stats_kernel(
    X,  # [B, C, HW] input, element strides below
    Partials,  # [B * G, SPLIT, 3] fp32 out: (count, mean - pivot, M2) of each chunk
    stride_xb, stride_xc, stride_xhw,  # X strides in elements: batch, channel, flattened spatial
    HW,  # spatial size H * W
    num_groups,  # G: splits program_id(1) into (batch, group)
    HW_PER_SPLIT,  # spatial positions per chunk, a multiple of BLOCK_HW
    SPLIT,  # chunks per group
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    BLOCK_C: tl.constexpr,  # CHANNELS_PER_GROUP padded to a power of two
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
):
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    off_b = (pid_bg // num_groups).to(tl.int64)
    off_g = pid_bg % num_groups

    offs_c = off_g * CHANNELS_PER_GROUP + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels of the group
    mask_c = tl.arange(0, BLOCK_C) < CHANNELS_PER_GROUP
    x_base = X + off_b * stride_xb + offs_c[None, :].to(tl.int64) * stride_xc
    pivot = tl.load(X + off_b * stride_xb + (off_g * CHANNELS_PER_GROUP).to(tl.int64) * stride_xc).to(tl.float32)

    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)  # [BLOCK_HW]
        mask = (offs_hw[:, None] < HW) & mask_c[None, :]  # [BLOCK_HW, BLOCK_C]
        x = tl.load(x_base + offs_hw[:, None].to(tl.int64) * stride_xhw, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(mask, x - pivot, 0.0)

        # Tile statistics centred on the tile's own mean, then merged into the running ones.
        tile_count = (tl.minimum(hw_end - hw0, BLOCK_HW) * CHANNELS_PER_GROUP).to(tl.float32)
        tile_mean = tl.sum(tl.sum(x, 1), 0) / tile_count
        dev = tl.where(mask, x - tile_mean, 0.0)
        tile_m2 = tl.sum(tl.sum(dev * dev, 1), 0)

        new_count = count + tile_count
        delta = tile_mean - mean
        mean += delta * (tile_count / new_count)
        m2 += tile_m2 + delta * delta * (count * tile_count / new_count)
        count = new_count

    out = Partials + (pid_bg * SPLIT + pid_s) * 3
    tl.store(out + 0, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _group_norm_apply_kernel(
    X,  # [B, C, HW] input, element strides below
    Y,  # [B, C, HW] output, element strides below, dtype of X
    Weight,  # [C] affine scale
    Bias,  # [C] affine shift
    Partials,  # [B * G, SPLIT, 3] fp32 (count, mean - pivot, M2) from _group_norm_stats_kernel
    stride_xb, stride_xc, stride_xhw,  # X strides in elements: batch, channel, flattened spatial
    stride_yb, stride_yc, stride_yhw,  # Y strides
    HW,  # spatial size H * W
    num_groups,  # G: splits program_id(1) into (batch, group)
    HW_PER_SPLIT,  # spatial positions per chunk, a multiple of BLOCK_HW
    SPLIT,  # chunks per group
    eps,  # added to the variance
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    BLOCK_C: tl.constexpr,  # CHANNELS_PER_GROUP padded to a power of two
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    BLOCK_SPLIT: tl.constexpr,  # SPLIT padded to a power of two
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
):
    pid_s = tl.program_id(0)
    pid_bg = tl.program_id(1)
    off_b = (pid_bg // num_groups).to(tl.int64)
    off_g = pid_bg % num_groups

    # Merge the chunks: mean = sum(n_s mean_s) / n, M2 = sum(M2_s + n_s (mean_s - mean)^2).
    offs_s = tl.arange(0, BLOCK_SPLIT)
    mask_s = offs_s < SPLIT
    part = Partials + (pid_bg * SPLIT + offs_s) * 3
    n_s = tl.load(part + 0, mask=mask_s, other=0.0)
    mean_s = tl.load(part + 1, mask=mask_s, other=0.0)
    m2_s = tl.load(part + 2, mask=mask_s, other=0.0)
    n = tl.sum(n_s, 0)
    mean = tl.sum(n_s * mean_s, 0) / n
    dmean = mean_s - mean
    m2 = tl.sum(m2_s + n_s * dmean * dmean, 0)
    rstd = tl.rsqrt(m2 / n + eps)

    offs_c = off_g * CHANNELS_PER_GROUP + tl.arange(0, BLOCK_C)  # [BLOCK_C] channels of the group
    mask_c = tl.arange(0, BLOCK_C) < CHANNELS_PER_GROUP
    w = tl.load(Weight + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    scale = w * rstd  # y = (x - pivot) * scale + shift
    shift = b - mean * scale

    x_base = X + off_b * stride_xb + offs_c[None, :].to(tl.int64) * stride_xc
    pivot = tl.load(X + off_b * stride_xb + (off_g * CHANNELS_PER_GROUP).to(tl.int64) * stride_xc).to(tl.float32)
    y_base = Y + off_b * stride_yb + offs_c[None, :].to(tl.int64) * stride_yc
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = (hw0 + tl.arange(0, BLOCK_HW)).to(tl.int64)  # [BLOCK_HW]
        mask = (offs_hw[:, None] < HW) & mask_c[None, :]  # [BLOCK_HW, BLOCK_C]
        x = tl.load(x_base + offs_hw[:, None] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
        y = (x - pivot) * scale[None, :] + shift[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + offs_hw[:, None] * stride_yhw, y.to(Y.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the CPU interpreter: any value works, this one gives several chunks on test shapes


@functools.lru_cache(maxsize=None)
def _plan(batch: int, channels: int, hw: int, num_groups: int, device: torch.device):
    """Tile and split sizes for one shape: (BLOCK_C, BLOCK_HW, HW_PER_SPLIT, SPLIT)."""
    block_c = triton.next_power_of_2(channels // num_groups)
    block_hw = max(1, min(_TILE // block_c, triton.next_power_of_2(hw)))
    tiles = triton.cdiv(hw, block_hw)
    split = min(tiles, max(1, triton.cdiv(_PROGRAMS_PER_SM * _num_sms(device), batch * num_groups)))
    hw_per_split = triton.cdiv(tiles, split) * block_hw
    split = triton.cdiv(hw, hw_per_split)  # no empty chunks
    return block_c, block_hw, hw_per_split, split


def group_norm(x, num_groups: int, weight, bias, eps: float, silu: bool = False, *, out=None):
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU if `silu`, for x [B, C, *].

    NCHW-contiguous and channels-last inputs are read in place and the result keeps the input's
    memory format; other layouts are made contiguous first. `out` (optional, x's shape) receives the
    result instead. weight/bias None mean 1/0.
    """
    B, C = x.shape[:2]
    assert C % num_groups == 0, f"GroupNorm: {C} channels do not split into {num_groups} groups"
    try:
        x3 = x.view(B, C, -1)  # [B, C, HW]
    except RuntimeError:  # spatial dims not mergeable in place
        x = x.contiguous()
        x3 = x.view(B, C, -1)
    if out is None:
        out = torch.empty_like(x)
    y3 = out.view(B, C, -1)  # [B, C, HW]
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=x.dtype)

    HW = x3.shape[2]
    block_c, block_hw, hw_per_split, split = _plan(B, C, HW, num_groups, x.device)
    partials = torch.empty((B * num_groups, split, 3), device=x.device, dtype=torch.float32)
    grid = (split, B * num_groups)
    meta = dict(CHANNELS_PER_GROUP=C // num_groups, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_NUM_WARPS)
    _group_norm_stats_kernel[grid](
        x3, partials, *x3.stride(), HW, num_groups, hw_per_split, split, **meta,
    )  # fmt: skip
    _group_norm_apply_kernel[grid](
        x3, y3, weight, bias, partials, *x3.stride(), *y3.stride(), HW, num_groups, hw_per_split, split, eps,
        BLOCK_SPLIT=triton.next_power_of_2(split), SILU=silu, **meta,
    )  # fmt: skip
    return out
