"""GroupNorm (+ optional SiLU) over [B, C, *] in NCHW or channels-last layout.

A (batch, group) pair alone gives only B * 32 = 64 programs at SD's batch 2, under half of an H200's
132 SMs, and the VAE decoder's full-resolution groups hold a million elements each. So a group's
spatial axis is split into SPLIT chunks and the work runs as two launches over (chunk, batch * group):

  1. `_group_norm_stats_kernel`: count, mean and M2 (sum of squared deviations) of each chunk.
  2. `_group_norm_apply_kernel`: merges the chunks' partials into the group's mean and variance,
     then writes (x - mean) * rstd * weight + bias, optionally through SiLU. For inputs larger
     than L2 the tuner also times it walking the grid last program first, so that its first
     reads are the lines the statistics pass left in L2.

Small groups (the 8x8 to 32x32 levels) are bound by launches rather than bytes, so there is also
`_group_norm_kernel`: one program per group does both passes, the second read mostly from L2.
Which of these plans runs for a shape is measured on the GPU at its first call (`_tuned_plan`).

Statistics: every lane of a tile keeps its own Welford mean and M2 over the tiles it walks (no
cross-thread traffic inside the loop, so loads issue back to back), and the lanes are merged once
per chunk with the parallel-variance formula. Large means (100 + randn) cost no precision:
everything works on x - pivot, the pivot being the group's (in the channels-last plan, each
channel's) first element, and Welford never forms E[x^2] - E[x]^2.

Tiles are [BLOCK_HW, BLOCK_C] with the spatial and channel strides passed in, so one kernel serves
both layouts: NCHW (spatial stride 1) and channels-last (channel stride 1). The output has the
input's memory format. Statistics are fp32 whatever the input dtype.

Channels-last input has a third plan. A group's row at one pixel is C // G channels: 20 bytes at
320 channels, 4-byte aligned, so the per-group kernels move 4-byte words and leave 6 of 16 lanes
empty. The `_group_norm_nhwc_*` kernels instead tile (chunk of pixels, block of channels that
ignores group boundaries: 64 at 320 channels, 128 bytes): per-channel statistics, then one
program per group merges its channels' chunks into per-channel (scale, shift), then the affine.
Three launches, but 16-byte vectors, no empty lanes, and fewer registers (more loads in flight).
NCHW input has one too ("flat"): there a group is one contiguous run of C // G * HW elements, so
the statistics kernel runs on it as a single channel, and `_group_norm_flat_apply_kernel` walks
it in tiles of whole rows (a power of two dividing HW), each row's channel from its index: every
lane holds data, where the per-group tile pads 10 channels to 16.
The tuner times every plan that applies to the call's layout; none replaces another untimed.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import tuning
from .launch import Launch

_TILE = 2048  # elements per [BLOCK_HW, BLOCK_C] tile: 16 per thread at 4 warps
_NUM_WARPS = 4
_DEFAULT_PROGRAMS_PER_SM = 4  # two-pass chunks per SM when nothing was measured
_TUNE_PROGRAMS_PER_SM = (2, 4, 8, 16)  # two-pass candidates timed at a shape's first CUDA call
_FUSED_MAX_TILES = 8  # default to one program per group up to this many tiles per group
_BLOCK_CHANNELS = 128  # channels-last plans: the most channels one program's block spans
_FINALIZE_TILE = 512  # channels-last plans: (chunk, channel) statistics per step of the merge loop
_MERGE_BLOCK = 64  # chunks' statistics per step of the apply kernels' merge loop
# Inputs of at least this many bytes also time each two-pass plan with its second pass last
# program first (see _pid): a third of an H200's 50 MB L2. Below it the whole input stays cached
# between the passes and the order cannot matter, so it is not worth a compile and a timing.
LAST_FIRST_MIN_BYTES = 16 * 2**20
# Inputs that large are timed rotating over copies that add up to this, each captured call reading
# another: on one input, call after call, a last-first plan's next statistics pass would start on
# the lines its apply just read, an L2 hit the network never gives it (a conv writes x between).
_ROTATE_BYTES = 128 * 2**20


@triton.jit
def _lane_stats(
    x_base,  # [1, BLOCK_C] pointers of the tile's channels at spatial position 0
    stride_xhw,  # spatial stride of X in elements
    pivot,  # fp32 value subtracted from every element (the group's first element, or 0)
    hw_start,  # first spatial position of the chunk
    hw_end,  # one past its last spatial position
    mask_c,  # [BLOCK_C] real channels of the tile
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (padded to a power of two)
):
    """Per lane of the [BLOCK_HW, BLOCK_C] tile: (mean - pivot, M2, count) of the elements the lane
    saw walking the chunk [hw_start, hw_end); count is 0 in padding channels."""
    offs = tl.arange(0, BLOCK_HW)
    mean = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # per-lane Welford mean of x - pivot
    m2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)  # per-lane sum of squared deviations
    n_full = (hw_end - hw_start) // BLOCK_HW
    seen = 0.0  # elements each real lane has seen so far
    for i in range(0, n_full):  # full tiles: every real lane sees one more element
        offs_hw = (hw_start + i * BLOCK_HW + offs).to(tl.int64)  # [BLOCK_HW]
        x = tl.load(x_base + offs_hw[:, None] * stride_xhw, mask=mask_c[None, :], other=0.0).to(tl.float32)
        x = tl.where(mask_c[None, :], x - pivot, 0.0)
        seen += 1.0
        delta = x - mean
        mean += delta * (1.0 / seen)
        m2 += delta * (x - mean)
    # The partial last tile (empty unless this is the group's last chunk): per-lane counts differ.
    offs_hw = hw_start + n_full * BLOCK_HW + offs  # [BLOCK_HW]
    mask_hw = offs_hw < hw_end
    mask = mask_hw[:, None] & mask_c[None, :]  # [BLOCK_HW, BLOCK_C]
    x = tl.load(x_base + offs_hw[:, None].to(tl.int64) * stride_xhw, mask=mask, other=0.0).to(tl.float32)
    x = tl.where(mask, x - pivot, 0.0)
    w = mask_hw[:, None].to(tl.float32)  # [BLOCK_HW, 1]: 1 where the lane has a tail element
    count = seen + w
    delta = x - mean
    mean += delta * w / tl.maximum(count, 1.0)
    m2 += delta * (x - mean) * w
    return mean, m2, tl.where(mask_c[None, :], count, 0.0)  # padding channels count 0


@triton.jit
def _chunk_stats(
    x_base,  # [1, BLOCK_C] pointers of the group's channels at spatial position 0
    stride_xhw,  # spatial stride of X in elements
    pivot,  # fp32 value subtracted from every element (the group's first element)
    hw_start,  # first spatial position of the chunk
    hw_end,  # one past its last spatial position
    mask_c,  # [BLOCK_C] real channels of the group
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    BLOCK_C: tl.constexpr,  # channels per tile (the group padded to a power of two)
):
    """(mean - pivot, M2, count) of x over the chunk [hw_start, hw_end) x the group's channels."""
    mean, m2, count = _lane_stats(x_base, stride_xhw, pivot, hw_start, hw_end, mask_c, BLOCK_HW, BLOCK_C)
    # Merge the lanes: n = sum(n_l), mean = sum(n_l mean_l) / n, M2 = sum(M2_l + n_l (mean_l - mean)^2).
    n = tl.sum(tl.sum(count, 1), 0)
    chunk_mean = tl.sum(tl.sum(count * mean, 1), 0) / tl.maximum(n, 1.0)
    dev = mean - chunk_mean
    return chunk_mean, tl.sum(tl.sum(m2 + count * dev * dev, 1), 0), n


@triton.jit
def _silu(y):
    """y * sigmoid(y), sigmoid as rsqrt(1 + e^-y)^2: an argument >= 1 (inf for y < -88, giving
    0) makes rsqrt a plain MUFU, where tl.sigmoid's division and exp's denormal fix-up cost 13.5
    SASS instructions per element on sm_90, most of this memory-bound pass's issue budget."""
    r = tl.math.rsqrt(1.0 + tl.math.exp2(y * -1.4426950408889634))  # e^-y = 2^(-y log2(e))
    return y * (r * r)


@triton.jit
def _pid(
    axis: tl.constexpr,  # grid axis
    LAST_FIRST: tl.constexpr,  # count from the far end of the axis
):
    """program_id(axis), or counted from the far end. A second pass that walks the grid in the
    reverse of the statistics pass's order starts on the chunks that pass read last: for a tensor
    larger than L2 (the VAE's 64 MB at 512x512) those are the lines still cached, where re-reading
    in the same order evicts each line just before it is needed (LRU's worst case)."""
    if LAST_FIRST:
        return tl.num_programs(axis) - 1 - tl.program_id(axis)
    return tl.program_id(axis)


@triton.jit
def _chunk_apply(
    x_base,  # [1, BLOCK_C] pointers of the group's channels in X at spatial position 0
    y_base,  # [1, BLOCK_C] the same in Y
    stride_xhw,  # spatial stride of X in elements
    stride_yhw,  # spatial stride of Y in elements
    pivot,  # fp32 value the statistics were taken around
    scale,  # [BLOCK_C] fp32 weight * rstd
    shift,  # [BLOCK_C] fp32 bias - (mean - pivot) * scale
    hw_start,  # first spatial position of the chunk
    hw_end,  # one past its last spatial position
    mask_c,  # [BLOCK_C] real channels of the group
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
):
    """y = (x - pivot) * scale + shift over the chunk, through SiLU if asked."""
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        offs_hw = (hw0 + tl.arange(0, BLOCK_HW)).to(tl.int64)  # [BLOCK_HW]
        mask = (offs_hw[:, None] < hw_end) & mask_c[None, :]  # [BLOCK_HW, BLOCK_C]
        x = tl.load(x_base + offs_hw[:, None] * stride_xhw, mask=mask, other=0.0).to(tl.float32)
        y = (x - pivot) * scale[None, :] + shift[None, :]
        if SILU:
            y = _silu(y)
        tl.store(y_base + offs_hw[:, None] * stride_yhw, y.to(y_base.dtype.element_ty), mask=mask)


@triton.jit
def _group_slice(
    X,  # [B, C, HW] tensor whose group slice is wanted
    stride_b,  # its batch stride in elements
    stride_c,  # its channel stride in elements
    pid_bg,  # batch * G + group of this program
    num_groups,  # G
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    BLOCK_C: tl.constexpr,  # CHANNELS_PER_GROUP padded to a power of two
):
    """Pointers into X for this program's group: its first element (the pivot, for X), the
    [1, BLOCK_C] row of its channels at spatial position 0; and the channels ([BLOCK_C]) and
    which of them are real."""
    off_b = (pid_bg // num_groups).to(tl.int64)
    c0 = (pid_bg % num_groups) * CHANNELS_PER_GROUP  # first channel of the group
    first = X + off_b * stride_b + c0.to(tl.int64) * stride_c
    lanes = tl.arange(0, BLOCK_C)
    return first, first + lanes[None, :].to(tl.int64) * stride_c, c0 + lanes, lanes < CHANNELS_PER_GROUP


@triton.jit
def _affine(
    Weight,  # [C] affine scale
    Bias,  # [C] affine shift
    offs_c,  # [BLOCK_C] the group's channels
    mask_c,  # [BLOCK_C] which are real
    mean,  # fp32 group mean of x - pivot
    rstd,  # fp32 1 / sqrt(variance + eps)
):
    """(scale, shift) per channel with y = (x - pivot) * scale + shift."""
    scale = tl.load(Weight + offs_c, mask=mask_c, other=0.0).to(tl.float32) * rstd
    shift = tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32) - mean * scale
    return scale, shift


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Two parts' (count, mean, M2) as one: the parallel-variance formula (n_a may be 0)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@triton.jit
def _merged_partials(
    part,  # pointer to a group's SPLIT (count, mean, M2) fp32 triples
    SPLIT,  # how many
    BLOCK_SPLIT: tl.constexpr,  # triples per step of the loop
):
    """(count, mean, M2) of the group from its chunks'. A fixed step (not SPLIT padded) keeps one
    compiled kernel for every split count the tuner tries."""
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(0, SPLIT, BLOCK_SPLIT):
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        mask_s = offs_s < SPLIT
        n_s = tl.load(part + offs_s * 3 + 0, mask=mask_s, other=0.0)
        mean_s = tl.load(part + offs_s * 3 + 1, mask=mask_s, other=0.0)
        m2_s = tl.load(part + offs_s * 3 + 2, mask=mask_s, other=0.0)
        n_t = tl.sum(n_s, 0)
        mean_t = tl.sum(n_s * mean_s, 0) / n_t
        dmean = mean_s - mean_t
        n, mean, m2 = _merge(n, mean, m2, n_t, mean_t, tl.sum(m2_s + n_s * dmean * dmean, 0))
    return n, mean, m2


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
    x0, x_base, offs_c, mask_c = _group_slice(X, stride_xb, stride_xc, pid_bg, num_groups, CHANNELS_PER_GROUP, BLOCK_C)
    pivot = tl.load(x0).to(tl.float32)

    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    mean, m2, count = _chunk_stats(x_base, stride_xhw, pivot, hw_start, hw_end, mask_c, BLOCK_HW, BLOCK_C)
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
    BLOCK_SPLIT: tl.constexpr,  # chunks' statistics per step of the merge
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
    LAST_FIRST: tl.constexpr,  # walk the grid last program first (see _pid)
):
    pid_s = _pid(0, LAST_FIRST)
    pid_bg = _pid(1, LAST_FIRST)
    n, mean, m2 = _merged_partials(Partials + pid_bg * SPLIT * 3, SPLIT, BLOCK_SPLIT)
    rstd = tl.rsqrt(m2 / n + eps)

    x0, x_base, offs_c, mask_c = _group_slice(X, stride_xb, stride_xc, pid_bg, num_groups, CHANNELS_PER_GROUP, BLOCK_C)
    _, y_base, _, _ = _group_slice(Y, stride_yb, stride_yc, pid_bg, num_groups, CHANNELS_PER_GROUP, BLOCK_C)
    pivot = tl.load(x0).to(tl.float32)
    scale, shift = _affine(Weight, Bias, offs_c, mask_c, mean, rstd)
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    _chunk_apply(x_base, y_base, stride_xhw, stride_yhw, pivot, scale, shift, hw_start, hw_end, mask_c, BLOCK_HW, SILU)


@triton.jit
def _group_norm_kernel(
    X,  # [B, C, HW] input, element strides below
    Y,  # [B, C, HW] output, element strides below, dtype of X
    Weight,  # [C] affine scale
    Bias,  # [C] affine shift
    stride_xb, stride_xc, stride_xhw,  # X strides in elements: batch, channel, flattened spatial
    stride_yb, stride_yc, stride_yhw,  # Y strides
    HW,  # spatial size H * W
    num_groups,  # G: splits program_id(0) into (batch, group)
    eps,  # added to the variance
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    BLOCK_C: tl.constexpr,  # CHANNELS_PER_GROUP padded to a power of two
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
):
    """One program per (batch, group): statistics over the whole group, then the affine."""
    pid_bg = tl.program_id(0)
    x0, x_base, offs_c, mask_c = _group_slice(X, stride_xb, stride_xc, pid_bg, num_groups, CHANNELS_PER_GROUP, BLOCK_C)
    _, y_base, _, _ = _group_slice(Y, stride_yb, stride_yc, pid_bg, num_groups, CHANNELS_PER_GROUP, BLOCK_C)
    pivot = tl.load(x0).to(tl.float32)

    mean, m2, n = _chunk_stats(x_base, stride_xhw, pivot, 0, HW, mask_c, BLOCK_HW, BLOCK_C)
    scale, shift = _affine(Weight, Bias, offs_c, mask_c, mean, tl.rsqrt(m2 / n + eps))
    _chunk_apply(x_base, y_base, stride_xhw, stride_yhw, pivot, scale, shift, 0, HW, mask_c, BLOCK_HW, SILU)


@triton.jit
def _group_norm_nhwc_stats_kernel(
    X,  # [B, C, HW] channels-last input (channel stride 1), element strides below
    Partials,  # [2, B, SPLIT, C] fp32 out: mean - X[b, c, 0] and M2 of each channel over each chunk
    stride_xb, stride_xc, stride_xhw,  # X strides in elements: batch, channel, flattened spatial
    C,  # channels
    HW,  # spatial size H * W
    HW_PER_SPLIT,  # spatial positions per chunk, a multiple of BLOCK_HW
    SPLIT,  # chunks
    BLOCK_C: tl.constexpr,  # channels per program: each pixel's row of them is one contiguous run
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
):
    """Per-channel statistics of one (chunk of pixels, block of channels). Channel blocks ignore
    group boundaries, so rows start 16-byte aligned where a single group's 10 channels are 20 bytes."""
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = c < C
    x_base = X + pid_b * stride_xb + c[None, :].to(tl.int64) * stride_xc  # [1, BLOCK_C]
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    # Each channel around its own first element: Welford from 0 would round every update at the
    # mean's ulp (100 + randn in fp32 then misses 1e-4 relative), and the apply would cancel.
    pivot = tl.load(x_base, mask=mask_c[None, :], other=0.0).to(tl.float32)  # [1, BLOCK_C] X[b, c, 0]
    mean, m2, count = _lane_stats(x_base, stride_xhw, pivot, hw_start, hw_end, mask_c, BLOCK_HW, BLOCK_C)
    # Lanes -> channels: n = sum(n_l), mean = sum(n_l mean_l) / n, M2 = sum(M2_l + n_l (mean_l - mean)^2).
    n_c = tl.sum(count, 0)  # [BLOCK_C]
    mean_c = tl.sum(count * mean, 0) / tl.maximum(n_c, 1.0)
    dev = mean - mean_c[None, :]
    out = Partials + (pid_b * SPLIT + pid_s) * C + c
    tl.store(out, mean_c, mask=mask_c)
    tl.store(out + tl.num_programs(2) * SPLIT * C, tl.sum(m2 + count * dev * dev, 0), mask=mask_c)


@triton.jit
def _group_norm_nhwc_finalize_kernel(
    X,  # [B, C, HW] the input: each channel's pivot X[b, c, 0]
    stride_xb, stride_xc,  # X batch and channel strides in elements
    Partials,  # [2, B, SPLIT, C] fp32 (mean - X[b, c, 0], M2) from _group_norm_nhwc_stats_kernel
    Weight,  # [C] affine scale
    Bias,  # [C] affine shift
    ScaleShift,  # [2, B, C] fp32 out: y = (x - X[b, c, 0]) * scale + shift per (batch, channel)
    B,  # batch
    HW,  # spatial size H * W: the chunks' counts follow from it
    HW_PER_SPLIT,  # spatial positions per chunk
    SPLIT,  # chunks
    num_groups,  # G: splits program_id(0) into (batch, group)
    eps,  # added to the variance
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    BLOCK_CG: tl.constexpr,  # CHANNELS_PER_GROUP padded to a power of two
    BLOCK_SPLIT: tl.constexpr,  # chunks per step of the merge loop, a power of two
):
    """One program per (batch, group): its channels' chunk statistics merged into the group's mean
    and variance, folded with the affine into one (scale, shift) per channel."""
    pid_bg = tl.program_id(0)
    C = num_groups * CHANNELS_PER_GROUP
    off_b = pid_bg // num_groups
    c0 = (pid_bg % num_groups) * CHANNELS_PER_GROUP  # the group's first channel
    c = c0 + tl.arange(0, BLOCK_CG)  # [BLOCK_CG] the group's channels
    mask_c = tl.arange(0, BLOCK_CG) < CHANNELS_PER_GROUP
    # Chunk means come relative to each channel's pivot; shift them to the first channel's. The
    # shift is a difference of two samples of the group, so small where the mean is large.
    x_b = X + off_b.to(tl.int64) * stride_xb
    pivot_c = tl.load(x_b + c.to(tl.int64) * stride_xc, mask=mask_c, other=0.0).to(tl.float32)  # [BLOCK_CG]
    to_group = pivot_c - tl.load(x_b + c0.to(tl.int64) * stride_xc).to(tl.float32)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(0, SPLIT, BLOCK_SPLIT):  # [BLOCK_SPLIT, BLOCK_CG] (chunk, channel) statistics at a time
        offs_s = s0 + tl.arange(0, BLOCK_SPLIT)
        # Elements per (chunk, channel): HW_PER_SPLIT, fewer in the last chunk, 0 in padding.
        n_s = tl.minimum(tl.maximum(HW - offs_s * HW_PER_SPLIT, 0), HW_PER_SPLIT).to(tl.float32)  # [BLOCK_SPLIT]
        mask = (offs_s[:, None] < SPLIT) & mask_c[None, :]  # [BLOCK_SPLIT, BLOCK_CG]
        n_sc = tl.where(mask, n_s[:, None], 0.0)
        part = Partials + (off_b * SPLIT + offs_s[:, None]) * C + c[None, :]
        mean_sc = tl.load(part, mask=mask, other=0.0) + to_group[None, :]
        m2_sc = tl.load(part + B * SPLIT * C, mask=mask, other=0.0)
        n_t = tl.sum(tl.sum(n_sc, 1), 0)
        mean_t = tl.sum(tl.sum(n_sc * mean_sc, 1), 0) / n_t
        dev = mean_sc - mean_t
        n, mean, m2 = _merge(n, mean, m2, n_t, mean_t, tl.sum(tl.sum(m2_sc + n_sc * dev * dev, 1), 0))
    rstd = tl.rsqrt(m2 / n + eps)
    scale, shift = _affine(Weight, Bias, c, mask_c, mean - to_group, rstd)  # back to each channel's pivot
    tl.store(ScaleShift + off_b * C + c, scale, mask=mask_c)
    tl.store(ScaleShift + (B + off_b) * C + c, shift, mask=mask_c)


@triton.jit
def _group_norm_nhwc_apply_kernel(
    X,  # [B, C, HW] channels-last input, element strides below
    Y,  # [B, C, HW] output, element strides below, dtype of X
    ScaleShift,  # [2, B, C] fp32 (scale, shift) around X[b, c, 0], from _group_norm_nhwc_finalize_kernel
    stride_xb, stride_xc, stride_xhw,  # X strides in elements: batch, channel, flattened spatial
    stride_yb, stride_yc, stride_yhw,  # Y strides
    C,  # channels
    HW,  # spatial size H * W
    HW_PER_SPLIT,  # spatial positions per chunk, a multiple of BLOCK_HW
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # spatial positions per tile
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
    LAST_FIRST: tl.constexpr,  # walk the grid last program first (see _pid)
):
    """y = (x - X[b, c, 0]) * scale + shift over one (chunk of pixels, block of channels), then SiLU if asked."""
    pid_s = _pid(0, LAST_FIRST)
    pid_c = _pid(1, LAST_FIRST)
    pid_b = _pid(2, LAST_FIRST).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask_c = c < C
    scale = tl.load(ScaleShift + pid_b * C + c, mask=mask_c, other=0.0)
    shift = tl.load(ScaleShift + (tl.num_programs(2) + pid_b) * C + c, mask=mask_c, other=0.0)
    x_base = X + pid_b * stride_xb + c[None, :].to(tl.int64) * stride_xc  # [1, BLOCK_C]
    y_base = Y + pid_b * stride_yb + c[None, :].to(tl.int64) * stride_yc
    hw_start = pid_s * HW_PER_SPLIT
    hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
    pivot = tl.load(x_base, mask=mask_c[None, :], other=0.0).to(tl.float32)  # [1, BLOCK_C] X[b, c, 0]
    _chunk_apply(x_base, y_base, stride_xhw, stride_yhw, pivot, scale, shift, hw_start, hw_end, mask_c, BLOCK_HW, SILU)


@triton.jit
def _group_norm_flat_apply_kernel(
    X,  # [B, C, HW] input, NCHW-contiguous per batch: a group is one run of CHANNELS_PER_GROUP * HW
    Y,  # [B, C, HW] output, same strides, dtype of X
    Weight,  # [C] affine scale
    Bias,  # [C] affine shift
    Partials,  # [B * G, SPLIT, 3] fp32 (count, mean - pivot, M2) from _group_norm_stats_kernel run on the flat group
    stride_b,  # batch stride of X and Y in elements
    HW,  # spatial size H * W, a multiple of ROW
    num_groups,  # G: splits program_id(1) into (batch, group)
    PER_SPLIT,  # elements of the flat group per chunk, a multiple of BLOCK_R * ROW
    SPLIT,  # chunks per group
    eps,  # added to the variance
    CHANNELS_PER_GROUP: tl.constexpr,  # C // G
    ROW: tl.constexpr,  # elements per tile row: a power of two dividing HW, so a row is in one channel
    BLOCK_R: tl.constexpr,  # rows per tile
    BLOCK_SPLIT: tl.constexpr,  # chunks' statistics per step of the merge
    SILU: tl.constexpr,  # apply x * sigmoid(x) after the affine
    LAST_FIRST: tl.constexpr,  # walk the grid last program first (see _pid)
):
    """The affine over one chunk of a group read as a flat run of [rows, ROW] tiles, each row's
    channel (for weight and bias) from its index: every lane holds data, where the per-group tile
    pads 10 channels to 16."""
    pid_s = _pid(0, LAST_FIRST)
    pid_bg = _pid(1, LAST_FIRST)
    n, mean, m2 = _merged_partials(Partials + pid_bg * SPLIT * 3, SPLIT, BLOCK_SPLIT)
    rstd = tl.rsqrt(m2 / n + eps)

    off_b = (pid_bg // num_groups).to(tl.int64)
    c0 = (pid_bg % num_groups) * CHANNELS_PER_GROUP  # first channel of the group
    group = off_b * stride_b + c0.to(tl.int64) * HW  # element offset of the group's run in X and Y
    pivot = tl.load(X + group).to(tl.float32)
    size = CHANNELS_PER_GROUP * HW
    start = pid_s * PER_SPLIT
    end = tl.minimum(start + PER_SPLIT, size)
    rows_per_channel = HW // ROW
    for r0 in range(start, end, BLOCK_R * ROW):
        row = r0 // ROW + tl.arange(0, BLOCK_R)  # [BLOCK_R] rows of the group
        offs = row[:, None] * ROW + tl.arange(0, ROW)[None, :]  # [BLOCK_R, ROW] offsets in the group
        mask_r = row * ROW < end
        mask = offs < end
        c = c0 + row // rows_per_channel  # [BLOCK_R] each row's channel
        scale, shift = _affine(Weight, Bias, c, mask_r, mean, rstd)
        x = tl.load(X + group + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - pivot) * scale[:, None] + shift[:, None]
        if SILU:
            y = _silu(y)
        tl.store(Y + group + offs, y.to(Y.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Plan:
    """How one shape is launched: tile sizes and how many chunks split each group."""

    block_c: int  # channels per tile: C // G (or a block's channels) padded to a power of two
    block_hw: int  # spatial positions per tile
    hw_per_split: int  # spatial positions per chunk, a multiple of block_hw
    split: int  # chunks per group; 1 means the one-launch `_group_norm_kernel` (per-group plans)
    kind: str = "group"  # "group": per-group tiles; "nhwc": blocks of block_c channels (channels-last,
    # `_group_norm_nhwc_*`); "flat": a group as one run (NCHW, `_group_norm_flat_apply_kernel`)
    last_first: bool = False  # two-pass plans: the second pass walks its grid last program first


def _chunks(length: int, block: int, programs: int, device: torch.device, per_sm: int) -> tuple[int, int]:
    """(elements per chunk, chunks) for an axis of `length` walked in tiles of `block`, cut so that
    `programs` programs per chunk make about `per_sm` programs per SM: whole tiles per chunk, no
    empty chunk (the count may come out 1)."""
    tiles = triton.cdiv(length, block)
    split = min(tiles, max(1, triton.cdiv(per_sm * tuning.num_sms(device), programs)))
    per_split = triton.cdiv(tiles, split) * block
    return per_split, triton.cdiv(length, per_split)


def _split_plan(batch: int, channels: int, hw: int, num_groups: int, device: torch.device, per_sm: int) -> Plan:
    """Chunks sized so the two-pass grid has about `per_sm` programs per SM (split may come out 1)."""
    block_c = triton.next_power_of_2(channels // num_groups)
    block_hw = max(1, min(_TILE // block_c, triton.next_power_of_2(hw)))
    return Plan(block_c, block_hw, *_chunks(hw, block_hw, batch * num_groups, device, per_sm))


def channel_block(channels: int) -> int:
    """Channels per program in the channels-last plan: the largest power of two up to
    _BLOCK_CHANNELS that divides C (no padding lanes; 320 -> 64), unless that is under 8 (16 bytes
    at fp16), then C padded to a power of two (at most _BLOCK_CHANNELS)."""
    block = _BLOCK_CHANNELS
    while channels % block:
        block //= 2
    return block if block >= 8 else min(_BLOCK_CHANNELS, triton.next_power_of_2(channels))


def _nhwc_plan(batch: int, channels: int, hw: int, device: torch.device, per_sm: int) -> Plan:
    """Channels-last plan: chunks of pixels x blocks of channels, about `per_sm` programs per SM."""
    block_c = channel_block(channels)
    block_hw = max(1, min(_TILE // block_c, triton.next_power_of_2(hw)))
    chunks = _chunks(hw, block_hw, batch * triton.cdiv(channels, block_c), device, per_sm)
    return Plan(block_c, block_hw, *chunks, kind="nhwc")


def _row(hw: int) -> int:
    """Elements per tile row of the flat plan: the largest power of two up to 128 dividing HW."""
    return math.gcd(hw, 128)


def _flat_plan(batch: int, channels: int, hw: int, num_groups: int, device: torch.device, per_sm: int) -> Plan:
    """NCHW plan: each group as one flat run of C // G * HW elements (statistics by
    `_group_norm_stats_kernel` with one "channel" per group), chunks of whole tiles."""
    size = channels // num_groups * hw
    block_hw = min(_TILE, triton.next_power_of_2(size))  # a multiple of the apply's rows
    return Plan(1, block_hw, *_chunks(size, block_hw, batch * num_groups, device, per_sm), kind="flat")


def plans(
    batch: int, channels: int, hw: int, num_groups: int, device: torch.device, layout: str = "strided",
    nbytes: int = 0,
) -> dict[str, Plan]:
    """The candidate plans for one shape, by name: "fused" (one program per group) and
    "split<programs per SM>" for each distinct two-pass split; for layout "nhwc" (channel stride
    1) also "nhwc<programs per SM>", for layout "nchw" (contiguous per batch, HW a multiple of 16:
    Triton proves 16-byte alignment only from integers divisible by 16) also "flat<programs per
    SM>", each distinct. For inputs of `nbytes` >= LAST_FIRST_MIN_BYTES every two-pass plan
    also comes as "<name>r", its second pass walking the grid last program first."""
    found = {"fused": _split_plan(batch, channels, hw, num_groups, device, 0)}  # per_sm 0: split 1
    for per_sm in _TUNE_PROGRAMS_PER_SM:
        plan = _split_plan(batch, channels, hw, num_groups, device, per_sm)
        if plan.split > 1 and plan not in found.values():
            found[f"split{per_sm}"] = plan
    for per_sm in _TUNE_PROGRAMS_PER_SM if layout == "nhwc" else ():
        plan = _nhwc_plan(batch, channels, hw, device, per_sm)
        if plan not in found.values():
            found[f"nhwc{per_sm}"] = plan
    for per_sm in _TUNE_PROGRAMS_PER_SM if layout == "nchw" and _row(hw) >= 16 else ():
        plan = _flat_plan(batch, channels, hw, num_groups, device, per_sm)
        if plan not in found.values():
            found[f"flat{per_sm}"] = plan
    if nbytes >= LAST_FIRST_MIN_BYTES:
        for name, plan in list(found.items()):
            if plan.kind != "group" or plan.split > 1:  # not "fused": it has no second pass
                found[name + "r"] = replace(plan, last_first=True)
    return found


@functools.lru_cache(maxsize=None)
def default_plan(batch: int, channels: int, hw: int, num_groups: int, device: torch.device) -> Plan:
    """The plan used when none was measured: one program per group for groups of a few tiles."""
    fused = _split_plan(batch, channels, hw, num_groups, device, 0)
    split = _split_plan(batch, channels, hw, num_groups, device, _DEFAULT_PROGRAMS_PER_SM)
    return fused if fused.hw_per_split <= _FUSED_MAX_TILES * fused.block_hw else split


# (B, C, HW, G, x strides, y strides, dtype, silu, device) -> (chosen Plan, {name: ms}); filled once
# per shape by _tuned_plan. Read by benchmarks/kernel_bench.py to print what was chosen and why.
TUNED: dict = {}


def launches(plan: Plan, x3, y3, weight, bias, num_groups: int, eps: float, silu: bool) -> list[Launch]:
    """The calls that run `plan` for x3 -> y3 ([B, C, HW] views), in order, not run (see `launch`)."""
    if plan.kind == "nhwc":
        return _nhwc_launches(plan, x3, y3, weight, bias, num_groups, eps, silu)
    B, C, HW = x3.shape
    meta = dict(CHANNELS_PER_GROUP=C // num_groups, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, num_warps=_NUM_WARPS)
    if plan.kind == "group" and plan.split == 1:
        args = (x3, y3, weight, bias, *x3.stride(), *y3.stride(), HW, num_groups, eps)
        return [Launch(_group_norm_kernel, (B * num_groups,), args, dict(meta, SILU=silu))]
    partials = torch.empty((B * num_groups, plan.split, 3), device=x3.device, dtype=torch.float32)
    grid = (plan.split, B * num_groups)
    if plan.kind == "flat":  # the statistics kernel reads each group as one channel of C // G * HW
        size = C // num_groups * HW
        stats = (x3, partials, x3.stride(0), size, 1, size, num_groups, plan.hw_per_split, plan.split)
        row = _row(HW)
        apply = (x3, y3, weight, bias, partials, x3.stride(0), HW, num_groups, plan.hw_per_split, plan.split, eps)
        apply_meta = dict(
            CHANNELS_PER_GROUP=C // num_groups, ROW=row, BLOCK_R=_TILE // row,
            BLOCK_SPLIT=_MERGE_BLOCK, SILU=silu, LAST_FIRST=plan.last_first, num_warps=_NUM_WARPS,
        )  # fmt: skip
        return [
            Launch(_group_norm_stats_kernel, grid, stats, dict(meta, CHANNELS_PER_GROUP=1)),
            Launch(_group_norm_flat_apply_kernel, grid, apply, apply_meta),
        ]
    stats = (x3, partials, *x3.stride(), HW, num_groups, plan.hw_per_split, plan.split)
    apply = (
        x3, y3, weight, bias, partials, *x3.stride(), *y3.stride(), HW, num_groups, plan.hw_per_split, plan.split, eps,
    )  # fmt: skip
    apply_meta = dict(meta, BLOCK_SPLIT=_MERGE_BLOCK, SILU=silu, LAST_FIRST=plan.last_first)
    return [Launch(_group_norm_stats_kernel, grid, stats, meta), Launch(_group_norm_apply_kernel, grid, apply, apply_meta)]


def launch(plan: Plan, x3, y3, weight, bias, num_groups: int, eps: float, silu: bool) -> None:
    """Run `plan`: GroupNorm (+ SiLU) of x3 into y3, both [B, C, HW] views."""
    for call in launches(plan, x3, y3, weight, bias, num_groups, eps, silu):
        call()


def finalize_rows(channels_per_group: int) -> int:
    """Chunks per step of `_group_norm_nhwc_finalize_kernel`'s loop: tiles of _FINALIZE_TILE
    (chunk, channel) statistics, so thousands of chunks cannot blow its registers, and one
    compiled kernel per group width whatever the split."""
    return max(1, _FINALIZE_TILE // triton.next_power_of_2(channels_per_group))


def _nhwc_launches(plan: Plan, x3, y3, weight, bias, num_groups: int, eps: float, silu: bool) -> list[Launch]:
    """The channels-last plan: per-channel statistics per (chunk, block of channels), merged per
    group into per-channel (scale, shift), then the affine per (chunk, block of channels)."""
    B, C, HW = x3.shape
    partials = torch.empty((2, B, plan.split, C), device=x3.device, dtype=torch.float32)
    scale_shift = torch.empty((2, B, C), device=x3.device, dtype=torch.float32)
    grid = (plan.split, triton.cdiv(C, plan.block_c), B)
    tiles = dict(BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, num_warps=_NUM_WARPS)
    cpg = C // num_groups
    finalize = (
        x3, x3.stride(0), x3.stride(1), partials, weight, bias, scale_shift, B, HW, plan.hw_per_split, plan.split,
        num_groups, eps,
    )  # fmt: skip
    finalize_meta = dict(
        CHANNELS_PER_GROUP=cpg, BLOCK_CG=triton.next_power_of_2(cpg), BLOCK_SPLIT=finalize_rows(cpg),
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    apply = (x3, y3, scale_shift, *x3.stride(), *y3.stride(), C, HW, plan.hw_per_split)
    return [
        Launch(_group_norm_nhwc_stats_kernel, grid, (x3, partials, *x3.stride(), C, HW, plan.hw_per_split, plan.split), tiles),
        Launch(_group_norm_nhwc_finalize_kernel, (B * num_groups,), finalize, finalize_meta),
        Launch(_group_norm_nhwc_apply_kernel, grid, apply, dict(tiles, SILU=silu, LAST_FIRST=plan.last_first)),
    ]


def _layout(x3, y3) -> str:
    """"nhwc" (channel stride 1), "nchw" (each batch's [C, HW] contiguous, the same batch stride in
    x and y), else "strided": which extra plans apply."""
    B, C, HW = x3.shape
    if x3.stride(1) == 1 and y3.stride(1) == 1:
        return "nhwc"
    if x3.stride()[1:] == y3.stride()[1:] == (HW, 1) and x3.stride(0) == y3.stride(0):
        return "nchw"
    return "strided"


def _tuned_plan(x3, y3, weight, bias, num_groups: int, eps: float, silu: bool) -> Plan:
    """The fastest candidate plan for this call's shape, layout and dtype, timed once. Where
    timing is impossible (see tuning.can_time), the untimed default, not remembered."""
    B, C, HW = x3.shape
    key = (B, C, HW, num_groups, x3.stride(), y3.stride(), x3.dtype, silu, x3.device)
    if key in TUNED:
        return TUNED[key][0]
    if not tuning.can_time(x3.device):
        return default_plan(B, C, HW, num_groups, x3.device)
    nbytes = x3.numel() * x3.element_size()
    candidates = plans(B, C, HW, num_groups, x3.device, _layout(x3, y3), nbytes)
    copies = max(2, math.ceil(_ROTATE_BYTES / nbytes)) if nbytes >= LAST_FIRST_MIN_BYTES else 1
    # Copies with x3's exact strides (clone would pack a batch-strided view): the plans key on them.
    twins = [torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device) for _ in range(copies - 1)]
    inputs = itertools.cycle([x3] + [t.copy_(x3) for t in twins])
    best, times = tuning.fastest(
        candidates, lambda plan: launch(plan, next(inputs), y3, weight, bias, num_groups, eps, silu)
    )
    TUNED[key] = (candidates[best], times)
    return candidates[best]


def group_norm(x, num_groups: int, weight, bias, eps: float, silu: bool = False, *, out=None):
    """F.group_norm(x, num_groups, weight, bias, eps), then SiLU if `silu`, for x [B, C, *].

    NCHW-contiguous and channels-last inputs are read in place and the result keeps the input's
    memory format; other layouts are made contiguous first. `out` (optional, x's shape) receives the
    result instead. weight/bias None mean 1/0. On CUDA the first call for each shape times the
    candidate launch plans (a few ms); make it before capturing a CUDA graph.
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
    plan = _tuned_plan(x3, y3, weight, bias, num_groups, eps, silu)
    launch(plan, x3, y3, weight, bias, num_groups, eps, silu)
    return out
