"""Triton kernels vs float64 torch references, on fresh random inputs.

Without CUDA the kernels run in Triton's CPU interpreter on small shapes: tests/conftest.py sets
TRITON_INTERPRET=1 for the run before fastdiff.kernels is imported, which is when @triton.jit picks
compiled vs interpreted.
With CUDA the "cuda" cases run the compiled kernels on SD1.5's real shapes (512x512, batch 2).

Every launch writes into a NaN-filled `out=` buffer, so an element the kernel forgets fails.
The last group of tests compiles (without running) each kernel for sm_90 at SD's shapes, in a
child process, and fails on compile errors or register spills: the CUDA path checked on CPU CI.

Tolerances: fp32 1e-4 relative (plus 1e-5 absolute for values near zero); fp16/bf16 2e-2 max abs.
bf16 keeps 8 significant bits, so 2e-2 holds for outputs below 4 in magnitude even at 1 ulp (the
interpreter rounds fp32 -> bf16 toward zero, so 1 ulp, not half): bf16 inputs are scaled to keep
outputs there.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from fastdiff import sd15  # noqa: E402
from fastdiff.kernels import attention as attn_mod  # noqa: E402
from fastdiff.kernels import geglu as geglu_mod  # noqa: E402
from fastdiff.kernels import group_norm as gn_mod  # noqa: E402
from fastdiff.kernels import tuning  # noqa: E402

INTERPRETED = triton.knobs.runtime.interpret  # read by @triton.jit when the kernels were imported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _need(device: str) -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: the compiled kernels need one")
        if INTERPRETED:
            pytest.skip("TRITON_INTERPRET=1 is set for this run: the CUDA cases need compiled kernels")
    elif not INTERPRETED:
        pytest.skip("kernels were compiled for CUDA in this process; CPU cases need TRITON_INTERPRET=1")


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    kernel_dtype = out.dtype
    out64 = out.double()
    assert not out64.isnan().any(), f"{out64.isnan().sum().item()} of {out64.numel()} elements not written (NaN)"
    err = (out64 - ref).abs()
    if kernel_dtype == torch.float32:
        bound = 1e-4 * ref.abs() + 1e-5
        i = (err - bound).argmax()
        assert (err <= bound).all(), f"fp32: err {err.flatten()[i]:.3g} at |ref| {ref.abs().flatten()[i]:.3g}"
    else:
        assert err.max().item() <= 2e-2, f"{kernel_dtype}: max abs err {err.max().item():.3g}"


def _poisoned(shape, dtype, device, transpose12: bool = False) -> torch.Tensor:
    if transpose12:  # [B, H, S, D] view of a [B, S, H, D] buffer, like the launcher's own output
        b, h, s, d = shape
        return torch.full((b, s, h, d), float("nan"), dtype=dtype, device=device).transpose(1, 2)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# attention


def _qkv(B, H, Sq, Sk, D, dtype, device, layout):
    """q/k/v as the model makes them: slices of packed projections (non-contiguous views)."""
    if layout == "packed":
        if Sq == Sk:  # self-attention: one [B, S, 3, H, D] projection
            qkv = torch.randn(B, Sq, 3, H, D, device=device, dtype=dtype)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, D]
        else:  # cross-attention: q from the image tokens, k/v from one [B, Sk, 2, H, D] projection
            q = torch.randn(B, Sq, H, D, device=device, dtype=dtype).transpose(1, 2)  # [B, H, Sq, D]
            kv = torch.randn(B, Sk, 2, H, D, device=device, dtype=dtype)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, Sk, D]
    elif layout == "contiguous":
        q = torch.randn(B, H, Sq, D, device=device, dtype=dtype)
        k = torch.randn(B, H, Sk, D, device=device, dtype=dtype)
        v = torch.randn(B, H, Sk, D, device=device, dtype=dtype)
    else:  # "dim-strided": head dim not unit-stride (k stored [B, H, D, Sk], v [D, B, H, Sk])
        q = torch.randn(B, H, Sq, D, device=device, dtype=dtype)
        k = torch.randn(B, H, D, Sk, device=device, dtype=dtype).transpose(2, 3)
        v = torch.randn(D, B, H, Sk, device=device, dtype=dtype).permute(1, 2, 3, 0)
    return q, k, v


def _attention_ref(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


# (head_dim, Sq, Sk, dtype, layout): every head dim with Sk = 77 and Sk = Sq, Sq in {1, 77, 100, 256};
# trimmed so the interpreter stays fast.
CPU_ATTENTION_CASES = [
    (40, 1, 77, torch.float32, "packed"),
    (40, 100, 77, torch.float16, "packed"),
    (40, 256, 256, torch.float32, "packed"),
    (64, 77, 77, torch.float32, "dim-strided"),
    (64, 100, 100, torch.float16, "packed"),
    (80, 100, 77, torch.float32, "packed"),
    (80, 77, 77, torch.float16, "contiguous"),
    (160, 100, 100, torch.float32, "packed"),
    (160, 1, 77, torch.float16, "dim-strided"),
    (160, 77, 77, torch.float32, "contiguous"),
    (80, 33, 32, torch.float32, "contiguous"),  # exactly one key tile: the tile ahead is all padding
    (40, 3, 1, torch.float16, "packed"),  # one key: the output is v
]


def _force_config(monkeypatch, split_d: bool, overlap_qk: bool) -> None:
    """Run the attention kernel with this one config (the autotuner does not time a single one)."""
    config = triton.Config(
        {"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_D": split_d, "OVERLAP_QK": overlap_qk}, num_warps=4, num_stages=1
    )
    monkeypatch.setattr(attn_mod.AUTOTUNER, "configs", [config])


@pytest.mark.parametrize(
    "split_d,overlap_qk", [(False, False), (True, False), (False, True), (True, True)],
    ids=["padded", "split", "padded-overlap", "split-overlap"],
)  # fmt: skip
@pytest.mark.parametrize("D,Sq,Sk,dtype,layout", CPU_ATTENTION_CASES)
def test_attention_cpu(D, Sq, Sk, dtype, layout, split_d, overlap_qk, monkeypatch):
    """Both ways of tiling the head dim (padded to a power of two, split into two parts), each with
    and without the next key tile's scores computed a step ahead."""
    _need("cpu")
    _force_config(monkeypatch, split_d, overlap_qk)
    B, H = 1, 2
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, "cpu", layout)
    out = _poisoned((B, H, Sq, D), dtype, "cpu", transpose12=(layout == "packed"))
    attn_mod.attention(q, k, v, out=out)
    _check(out, _attention_ref(q, k, v))


@pytest.mark.parametrize(
    "split_d,overlap_qk", [(False, False), (True, False), (False, True)], ids=["padded", "split", "overlap"]
)
@pytest.mark.parametrize(
    "D,Sq,Sk,splits",
    [(40, 10, 100, 2), (80, 33, 160, 4), (160, 3, 64, 3), (64, 40, 77, 4)],
    ids=["d40-2chunks", "d80-4chunks", "d160-empty-chunk", "d64-tail-4chunks"],
)  # fmt: skip
def test_attention_cpu_key_splits(D, Sq, Sk, splits, split_d, overlap_qk, monkeypatch):
    """The key axis in chunks (partial results merged by the combine kernel), including a chunk
    with no keys (64 keys in 32-key tiles over 3 chunks) and a masked key tail."""
    _need("cpu")
    _force_config(monkeypatch, split_d, overlap_qk)
    q, k, v = _qkv(1, 2, Sq, Sk, D, torch.float32, "cpu", "packed")
    out = _poisoned((1, 2, Sq, D), torch.float32, "cpu")
    attn_mod.launch(q, k, v, out, D**-0.5, splits)
    _check(out, _attention_ref(q, k, v))


def test_attention_split_tuner(monkeypatch):
    """The key-split choice (CUDA-only in use) with a stand-in timer: only where the query tiles
    leave SMs idle, each candidate timed once, the fastest kept, the result still right."""
    _need("cpu")
    timed = []

    def fake_time(fn):
        fn()
        timed.append(len(timed))
        return [3.0, 1.0, 2.0][len(timed) - 1]  # "1", "2", "4" chunks: 2 chunks fastest

    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", fake_time)
    monkeypatch.setattr(tuning, "num_sms", lambda device: 132)
    monkeypatch.setattr(attn_mod, "TUNED_SPLITS", {})
    q, k, v = _qkv(1, 2, 70, 256, 40, torch.float16, "cpu", "packed")
    _check(attn_mod.attention(q, k, v), _attention_ref(q, k, v))
    assert len(timed) == 3 and [v[0] for v in attn_mod.TUNED_SPLITS.values()] == [2]
    attn_mod.attention(q, k, v)  # remembered: not timed again
    assert len(timed) == 3
    monkeypatch.setattr(tuning, "num_sms", lambda device: 2)  # 2 query tiles x 2 heads fill 2 SMs
    q2 = q[:, :, :64]
    _check(attn_mod.attention(q2, k, v), _attention_ref(q2, k, v))
    assert len(timed) == 3 and list(attn_mod.TUNED_SPLITS.values())[-1] == (1, {})


def test_attention_default_output_and_scale():
    """Without out=, the result is [B, H, Sq, D] over a [B, Sq, H, D] buffer; scale is honoured."""
    _need("cpu")
    q, k, v = _qkv(2, 3, 33, 77, 40, torch.float32, "cpu", "packed")
    out = attn_mod.attention(q, k, v, scale=0.3)
    assert out.shape == (2, 3, 33, 40) and out.transpose(1, 2).is_contiguous()
    _check(out, _attention_ref(q, k, v, scale=0.3))
    with pytest.raises(ValueError, match="positive"):
        attn_mod.attention(q, k, v, scale=-0.3)


def test_attention_head_dim_512_falls_back():
    """The VAE mid-block's single 512-wide head goes through torch SDPA (documented fallback)."""
    _need("cpu")
    q, k, v = _qkv(1, 1, 64, 64, 512, torch.float32, "cpu", "packed")
    out = _poisoned((1, 1, 64, 512), torch.float32, "cpu")
    attn_mod.attention(q, k, v, out=out)
    _check(out, _attention_ref(q, k, v))


def test_attention_configs_pruned_to_sequence_and_registers():
    """The GPU autotune list (built here without a GPU) keeps only tiles that fit: none longer than
    the sequence (down to 64 x 32), none whose fp32 accumulator exceeds 64 registers per thread
    (the split head dim counts A + B lanes), a split head dim only where D is not a power of two."""
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_D": sd, "OVERLAP_QK": False}, num_warps=w, num_stages=s)
        for bm, bn, w, s, sd in [
            (128, 64, 4, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False), (128, 64, 8, 3, True),
            (64, 64, 8, 2, True), (64, 32, 8, 2, False),
        ]
    ]  # fmt: skip

    def kept(sq, sk, d, dtype=torch.float16):
        args = {"Q": torch.empty(0, dtype=dtype), "SEQ_Q": sq, "SEQ_K": sk}
        pruned = attn_mod.prune_configs(configs, args, HEAD_DIM=d)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_D"]) for c in pruned]

    pad = [(128, 64, False), (128, 128, False), (64, 64, False)]
    assert kept(4096, 4096, 64) == [*pad, (64, 32, False)]  # a power of two: nothing to split
    assert kept(4096, 4096, 40) == [*pad, (128, 64, True), (64, 64, True), (64, 32, False)]  # 32 + 16
    assert kept(64, 77, 64) == [(64, 64, False), (64, 32, False)]  # 64 query rows: no 128-row tiles
    assert kept(4096, 20, 64) == [(64, 32, False)]  # 20 keys: 32-key tiles only
    # D = 160: padded to 256 only 64 rows over 8 warps fit; split 128 + 32 also fits 64 x 64 over 8.
    assert kept(4096, 4096, 160) == [(64, 64, True), (64, 32, False)]
    assert kept(10, 10, 16) == [(64, 32, False)]
    assert kept(4096, 4096, 40, torch.float32) == [(64, 32, False)]  # fp32: small tiles, never split
    assert [attn_mod.head_dim_parts(d, True) for d in (40, 80, 160, 64, 8, 72)] == [
        (32, 16), (64, 16), (128, 32), (64, 0), (16, 0), (64, 16),
    ]  # fmt: skip
    assert attn_mod.head_dim_parts(40, False) == (64, 0)

    # Scores a tile ahead: only where there are at least 4 key tiles, never for fp32.
    ahead = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "SPLIT_D": False, "OVERLAP_QK": True}, num_warps=4)]

    def kept_ahead(sk, dtype=torch.float16):
        return len(attn_mod.prune_configs(ahead + configs[-1:], {"Q": torch.empty(0, dtype=dtype), "SEQ_Q": 4096, "SEQ_K": sk}, HEAD_DIM=64))

    assert (kept_ahead(256), kept_ahead(255), kept_ahead(77), kept_ahead(4096, torch.float32)) == (2, 1, 1, 1)
    chunked = {"Q": torch.empty(0, dtype=torch.float16), "SEQ_Q": 256, "SEQ_K": 1024}
    assert len(attn_mod.prune_configs(ahead + configs[-1:], {**chunked, "NUM_SPLITS": 4}, HEAD_DIM=64)) == 2
    assert len(attn_mod.prune_configs(ahead + configs[-1:], {**chunked, "NUM_SPLITS": 8}, HEAD_DIM=64)) == 1


# No bf16 attention case on the CPU: Triton's interpreter computes tl.dot on bf16 by multiplying the
# raw uint16 bit patterns (runtime/interpreter.py create_dot); the CUDA cases check bf16 attention.


# SD1.5 at 512x512 with CFG (the UNet's shapes), and the VAE mid-block's single 512 head.
CUDA_ATTENTION_SHAPES = [*sd15.ATTENTION_SHAPES, (1, 1, 4096, 4096, 512)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Sq,Sk,D", CUDA_ATTENTION_SHAPES)
def test_attention_cuda(B, H, Sq, Sk, D, dtype):
    _need("cuda")
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, "cuda", "packed")
    out = _poisoned((B, H, Sq, D), dtype, "cuda", transpose12=True)
    attn_mod.attention(q, k, v, out=out)
    _check(out, _attention_ref(q, k, v))


@pytest.mark.parametrize(
    "B,H,Sq,Sk,D", [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80), (2, 8, 256, 256, 160)]
)
def test_attention_cuda_every_config(B, H, Sq, Sk, D, monkeypatch):
    """Each tile config the autotuner may pick at this shape (padded and split head dim, scores a
    tile ahead, 32- to 128-row tiles), forced one at a time, whichever wins the timing here."""
    _need("cuda")
    q, k, v = _qkv(B, H, Sq, Sk, D, torch.float16, "cuda", "packed")
    ref = _attention_ref(q, k, v)
    kept = attn_mod.prune_configs(attn_mod.configs(), {"Q": q, "SEQ_Q": Sq, "SEQ_K": Sk}, HEAD_DIM=D)
    assert {c.kwargs["SPLIT_D"] for c in kept} == {False, True}
    for config in kept:
        monkeypatch.setattr(attn_mod.AUTOTUNER, "configs", [config])
        out = _poisoned((B, H, Sq, D), torch.float16, "cuda", transpose12=True)
        attn_mod.launch(q, k, v, out, D**-0.5, 1)  # the whole key axis per program (splits: below)
        try:
            _check(out, ref)
        except AssertionError as e:
            raise AssertionError(f"{config}: {e}") from None


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,Sq,Sk,D", [(2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160)])
def test_attention_cuda_key_splits(B, H, Sq, Sk, D, dtype, splits):
    """The short-query shapes with the key axis split, whatever the split tuner picks here."""
    _need("cuda")
    q, k, v = _qkv(B, H, Sq, Sk, D, dtype, "cuda", "packed")
    out = _poisoned((B, H, Sq, D), dtype, "cuda", transpose12=True)
    attn_mod.launch(q, k, v, out, D**-0.5, splits)
    _check(out, _attention_ref(q, k, v))


def test_attention_cuda_fp32_odd_lengths():
    _need("cuda")
    q, k, v = _qkv(2, 8, 999, 77, 40, torch.float32, "cuda", "dim-strided")
    out = _poisoned((2, 8, 999, 40), torch.float32, "cuda")
    attn_mod.attention(q, k, v, out=out)
    _check(out, _attention_ref(q, k, v))


# ----------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)




def _group_norm_case(shape, groups, dtype, device, channels_last, mean=0.0, eps=1e-5, silu=True, plan=None, scale=1.0):
    """One launch against float64 torch on `scale` * randn + `mean`; `plan` (a name from _plans)
    forces that launch plan, else the launcher picks as in use."""
    x = (scale * torch.randn(shape, device=device) + mean).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    C = shape[1]
    weight = (0.5 + 0.1 * torch.randn(C, device=device)).to(dtype)  # keeps |y| < 4 for bf16
    bias = (0.1 * torch.randn(C, device=device)).to(dtype)
    out = torch.full_like(x, float("nan"))  # same memory format as x
    if plan is None:
        gn_mod.group_norm(x, groups, weight, bias, eps, silu=silu, out=out)
    else:
        B, HW = shape[0], x[0, 0].numel()
        layout = "nhwc" if channels_last else "nchw"  # every plan, the last-first ones too:
        chosen = gn_mod.plans(B, C, HW, groups, x.device, layout, gn_mod.LAST_FIRST_MIN_BYTES)[plan]
        gn_mod.launch(chosen, x.view(B, C, -1), out.view(B, C, -1), weight, bias, groups, eps, silu)
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), eps)
    _check(out, F.silu(y) if silu else y)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_cpu_dtypes_layouts(dtype, channels_last):
    """320 channels (10 per group: padded tile) at a tiny 5x7, the SD eps 1e-6 of the UNet."""
    _need("cpu")
    _group_norm_case((1, 320, 5, 7), 32, dtype, "cpu", channels_last, eps=1e-6, silu=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_group_norm_cpu_eps_silu(eps, silu, channels_last):
    """960 channels (30 per group), both eps values, with and without SiLU, in both layouts."""
    _need("cpu")
    _group_norm_case((1, 960, 3, 5), 32, torch.float32, "cpu", channels_last=channels_last, eps=eps, silu=silu)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_variance_near_eps_every_plan(channels_last):
    """1e-3 * randn has a variance of 1e-6, SD's eps: rstd = 1 / sqrt(var + eps) then depends on eps
    as much as on the data, so every plan's use of eps is checked (inputs of variance ~1 hide it)."""
    _need("cpu")
    shape, groups = (2, 320, 16, 16), 32  # a shape with every plan kind: fused, split, flat / nhwc, last-first
    layout = "nhwc" if channels_last else "nchw"
    plans = gn_mod.plans(shape[0], shape[1], shape[2] * shape[3], groups, torch.device("cpu"), layout, gn_mod.LAST_FIRST_MIN_BYTES)
    assert {"fused", "split8", "flat8" if layout == "nchw" else "nhwc8", "split8r"} <= set(plans), plans
    for plan in plans:
        _group_norm_case(shape, groups, torch.float32, "cpu", channels_last, eps=1e-6, silu=False, plan=plan, scale=1e-3)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_constant_groups(channels_last):
    """Zero variance: every group constant (a flat region), so y = bias exactly, with no NaN from
    the statistics (a naive E[x^2] - E[x]^2 can go negative there)."""
    _need("cpu")
    _group_norm_case((2, 64, 5, 7), 32, torch.float32, "cpu", channels_last, mean=0.37, eps=1e-6, silu=True, scale=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_large_mean(channels_last, dtype):
    """100 + randn: a naive E[x^2] - E[x]^2 in fp32 would lose most digits of the variance."""
    _need("cpu")
    _group_norm_case((2, 64, 6, 6), 8, dtype, "cpu", channels_last, mean=100.0, eps=1e-6, silu=False)


@pytest.mark.parametrize("plan", ["fused", "split4", "split8"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_plans(channels_last, plan):
    """Launch plans on one shape: one program per group (the whole group in a loop of tiles),
    and two-pass splits into 2 and 4 chunks per group; a partial last tile in all."""
    _need("cpu")
    shape, groups = (1, 64, 90, 90), 32
    hw = shape[2] * shape[3]
    plans = gn_mod.plans(shape[0], shape[1], hw, groups, torch.device("cpu"))
    block_hw = plans["fused"].block_hw
    assert (plans["split4"].split, plans["split8"].split) == (2, 4) and hw % block_hw != 0
    assert plans[plan].hw_per_split > block_hw  # several tiles per chunk
    _group_norm_case(shape, groups, torch.float32, "cpu", channels_last, mean=3.0, eps=1e-5, silu=True, plan=plan)


@pytest.mark.parametrize(
    "shape, groups, mean",
    [
        ((1, 320, 5, 7), 32, 0.0),  # blocks of 64 channels: groups of 10 straddle them
        ((2, 128, 9, 9), 32, 100.0),  # 4 channels per group, one block; a large mean
        ((2, 100, 6, 5), 20, 3.0),  # C = 100: blocks of 4 would be under 16 bytes, so one padded block
        ((1, 64, 45, 45), 32, 3.0),  # several tiles per chunk and a partial last tile
        ((1, 1280, 12, 12), 32, 3.0),  # 40 channels per group: the merge loop takes 8 chunks at a time
    ],
    ids=str,
)
def test_group_norm_cpu_nhwc_plans(shape, groups, mean):
    """The channels-last plans (per-channel statistics over blocks of channels, merged per group
    by a second kernel, applied by a third), every distinct one the tuner may try at the shape."""
    _need("cpu")
    B, C, HW = shape[0], shape[1], shape[2] * shape[3]
    names = [n for n, p in gn_mod.plans(B, C, HW, groups, torch.device("cpu"), "nhwc").items() if p.kind == "nhwc"]
    assert names and not any(p.kind == "nhwc" for p in gn_mod.plans(B, C, HW, groups, torch.device("cpu")).values())
    for plan in names:
        _group_norm_case(shape, groups, torch.float32, "cpu", True, mean=mean, eps=1e-6, silu=True, plan=plan)
    if C == 1280:
        plan = gn_mod.plans(B, C, HW, groups, torch.device("cpu"), "nhwc")[names[-1]]
        assert gn_mod.finalize_rows(C // groups) < plan.split  # the loop runs more than once


@pytest.mark.parametrize(
    "shape, groups, mean",
    [
        ((1, 320, 8, 8), 32, 0.0),  # 10 channels per group: 640-element runs, rows of 64 (10 channels x 1 row)
        ((2, 128, 16, 16), 32, 100.0),  # 4 channels per group, rows of 128; a large mean
        ((1, 960, 8, 4), 32, 3.0),  # rows of 32, 30 channels per group
        ((1, 64, 48, 48), 32, 3.0),  # 4608-element groups: 3 tiles, the last partial; several chunks
    ],
    ids=str,
)
def test_group_norm_cpu_flat_plans(shape, groups, mean):
    """The NCHW flat plans (a group's contiguous run as tiles of whole rows, each row's channel from
    its index), every distinct one the tuner may try; none where HW has no 16-byte rows."""
    _need("cpu")
    B, C, HW = shape[0], shape[1], shape[2] * shape[3]
    names = [n for n, p in gn_mod.plans(B, C, HW, groups, torch.device("cpu"), "nchw").items() if p.kind == "flat"]
    assert names and not any(p.kind == "flat" for p in gn_mod.plans(1, 64, 9 * 9, 32, torch.device("cpu"), "nchw").values())
    for plan in names:
        _group_norm_case(shape, groups, torch.float32, "cpu", False, mean=mean, eps=1e-6, silu=True, plan=plan)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_group_norm_cpu_layout_plans_keep_fp32_precision_at_a_large_mean(layout):
    """100 + randn in fp32 with no SiLU (which would halve errors near 0), 4096 pixels: enough
    updates per lane that statistics taken around 0 rather than a pivot, or an affine that cancels
    x ~ 100 against a shift ~ -100, miss the 1e-4 relative bound (a review measured 1.3e-5
    absolute errors in a channels-last plan without per-channel pivots)."""
    _need("cpu")
    shape = (1, 128, 64, 64)
    kind = "nhwc" if layout == "nhwc" else "flat"
    names = [n for n, p in gn_mod.plans(1, 128, 64 * 64, 32, torch.device("cpu"), layout).items() if p.kind == kind]
    assert names
    for plan in names:
        _group_norm_case(shape, 32, torch.float32, "cpu", layout == "nhwc", mean=100.0, eps=1e-6, silu=False, plan=plan)


def test_group_norm_channel_block():
    """Channels per program in the channels-last plan at SD's channel counts: no padding lanes,
    at most 128; a count with no power-of-two divisor of 8 or more is padded instead."""
    got = {c: gn_mod.channel_block(c) for c in (320, 640, 960, 1280, 1920, 2560, 128, 256, 512, 100)}
    assert got == {320: 64, 640: 128, 960: 64, 1280: 128, 1920: 128, 2560: 128, 128: 128, 256: 128, 512: 128, 100: 128}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_merge_in_steps(monkeypatch, channels_last):
    """The kernels that merge chunk statistics take a fixed number per step (one compiled kernel
    for every split the tuner tries): at 2 (finalize: 4 values) per step every multi-chunk plan
    loops, some with a half-empty last step."""
    _need("cpu")
    monkeypatch.setattr(gn_mod, "_MERGE_BLOCK", 2)
    monkeypatch.setattr(gn_mod, "_FINALIZE_TILE", 4)
    shape, groups = (1, 64, 35, 35), 8
    plans = gn_mod.plans(1, 64, 35 * 35, groups, torch.device("cpu"), "nhwc" if channels_last else "nchw")
    looped = {n: p.split for n, p in plans.items() if p.split > 2}
    assert len(looped) >= 2 and any(v % 2 for v in looped.values()), looped
    for plan in looped:
        _group_norm_case(shape, groups, torch.float32, "cpu", channels_last, mean=3.0, eps=1e-5, silu=True, plan=plan)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cpu_last_first_plans(channels_last):
    """Every two-pass plan with its second pass walking the grid last program first (offered for
    inputs of _LAST_FIRST_MIN_BYTES or more), at a small shape with several chunks per group."""
    _need("cpu")
    shape, groups, layout = (1, 64, 32, 32), 8, "nhwc" if channels_last else "nchw"
    plans = gn_mod.plans(1, 64, 32 * 32, groups, torch.device("cpu"), layout, gn_mod.LAST_FIRST_MIN_BYTES)
    names = [n for n, p in plans.items() if p.last_first]
    assert {plans[n].kind for n in names} == {"group", "nhwc" if channels_last else "flat"}, plans
    assert not any(p.last_first for p in gn_mod.plans(1, 64, 32 * 32, groups, torch.device("cpu"), layout).values())
    for name in names:
        _group_norm_case(shape, groups, torch.float32, "cpu", channels_last, mean=3.0, plan=name)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # e^-y = inf: by design
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_group_norm_silu_over_the_whole_range(device):
    """The kernels' own SiLU (rsqrt(1 + e^-y)^2 for the sigmoid) where randn inputs never go:
    per-channel biases from -120 to 120 put y on both sides of e^-y's overflow (y < -88), every
    layout's apply kernel, fp32 against float64."""
    _need(device)
    C = 320
    bias = torch.linspace(-120, 120, C, device=device)
    weight = torch.full((C,), 0.5, device=device)
    for channels_last in (False, True):
        x = torch.randn(2, C, 6, 6, device=device)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        B, HW = 2, 36
        layout = "nhwc" if channels_last else "nchw"
        plans = gn_mod.plans(B, C, HW, 32, x.device, layout, gn_mod.LAST_FIRST_MIN_BYTES)  # + last-first
        assert any(p.last_first for p in plans.values()) or not channels_last  # NCHW 6x6: one pass only
        for name, plan in plans.items():
            out = torch.full_like(x, float("nan"))
            gn_mod.launch(plan, x.view(B, C, -1), out.view(B, C, -1), weight, bias, 32, 1e-5, True)
            _check(out, F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-5)))


def test_group_norm_default_plan():
    """Untimed (CPU, or during graph capture): one program per group for groups of a few tiles,
    two-pass chunks for large groups."""
    cpu = torch.device("cpu")
    assert gn_mod.default_plan(2, 1280, 8 * 8, 32, cpu).split == 1
    big = gn_mod.default_plan(1, 128, 512 * 512, 32, cpu)
    assert big.split > 1 and big == gn_mod.plans(1, 128, 512 * 512, 32, cpu)["split4"]


def test_group_norm_cpu_other_layout_and_no_affine():
    """A layout that is neither NCHW nor channels-last is made contiguous; None affine = 1/0."""
    _need("cpu")
    x = torch.randn(1, 7, 5, 16).transpose(1, 3)  # [1, 16, 5, 7] with odd strides
    out = gn_mod.group_norm(x, 4, None, None, 1e-5)
    _check(out, F.group_norm(x.double(), 4, None, None, 1e-5))


CUDA_GROUP_NORM_SHAPES = [(2, c, s, s) for c, s in [(320, 64), (640, 32), (1280, 16), (1280, 8), (960, 64)]] + [
    (1, 128, 512, 512),  # VAE decoder at full resolution
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", CUDA_GROUP_NORM_SHAPES, ids=str)
def test_group_norm_cuda(shape, dtype, channels_last):
    """As the launcher picks (timed on the first call), at SD1.5's shapes."""
    _need("cuda")
    _group_norm_case(shape, 32, dtype, "cuda", channels_last, mean=100.0 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(2, 320, 64, 64), (2, 1280, 16, 16), (1, 128, 512, 512)], ids=str)
def test_group_norm_cuda_plans(shape, channels_last):
    """Every launch plan the tuner may pick at this shape (fp16), whichever it does pick on this GPU."""
    _need("cuda")
    layout, nbytes = "nhwc" if channels_last else "nchw", 2 * shape[0] * shape[1] * shape[2] * shape[3]
    names = gn_mod.plans(shape[0], shape[1], shape[2] * shape[3], 32, torch.device("cuda"), layout, nbytes)
    assert any(p.last_first for p in names.values()) == (nbytes >= gn_mod.LAST_FIRST_MIN_BYTES)
    assert len(names) >= 3 and {p.kind for p in names.values()} == {"group", "nhwc" if channels_last else "flat"}, names
    for plan in names:
        _group_norm_case(shape, 32, torch.float16, "cuda", channels_last, plan=plan)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_cuda_plans_fp32_large_mean(channels_last):
    """Every plan in fp32 at 100 + randn without SiLU, at an SD1.5 shape: the case where a
    channels-last plan without per-channel pivots missed the 1e-4 relative bound (interpreter)."""
    _need("cuda")
    shape = (2, 320, 64, 64)
    names = gn_mod.plans(2, 320, 64 * 64, 32, torch.device("cuda"), "nhwc" if channels_last else "nchw")
    for plan in names:
        _group_norm_case(shape, 32, torch.float32, "cuda", channels_last, mean=100.0, eps=1e-6, silu=False, plan=plan)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_tuner_picks_the_fastest_plan(monkeypatch, channels_last):
    """The tuning path (CUDA-only in use) with a stand-in timer: each candidate timed once, the
    fastest chosen and remembered, the result still right; channels-last input adds its plans."""
    _need("cpu")
    fake_ms, launched, timing = {}, [], []
    launch = gn_mod.launch

    def fake_time(fn):
        timing.append(True)
        fn()
        timing.clear()
        fake_ms[len(fake_ms)] = 1.0 / (1 + len(fake_ms))  # later candidates "faster": picks the last
        return fake_ms[len(fake_ms) - 1]

    def recording_launch(plan, *args):
        launched.append(plan)
        if not timing:  # timed calls are only recorded: Triton's interpreter runs every program in Python
            return launch(plan, *args)

    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", fake_time)
    monkeypatch.setattr(gn_mod, "TUNED", {})
    monkeypatch.setattr(gn_mod, "launch", recording_launch)
    shape = (1, 64, 40, 40)
    plans = gn_mod.plans(1, 64, 40 * 40, 8, torch.device("cpu"), "nhwc" if channels_last else "nchw")
    assert {p.kind for p in plans.values()} == {"group", "nhwc" if channels_last else "flat"}
    _group_norm_case(shape, 8, torch.float32, "cpu", channels_last)
    assert len(fake_ms) == len(plans) >= 3
    ((chosen, times),) = gn_mod.TUNED.values()
    assert chosen == list(plans.values())[-1] and list(times) == list(plans)
    assert launched == [*plans.values(), chosen]  # each candidate timed, then the choice run
    _group_norm_case(shape, 8, torch.float32, "cpu", channels_last)  # remembered: not timed again
    assert len(fake_ms) == len(plans) and launched[-1] == chosen


def test_group_norm_tuner_rotates_large_inputs(monkeypatch):
    """Inputs offered last-first plans are timed over copies, call after call on another one (the
    same input each call would hand those plans L2 hits the network never gives them); smaller
    inputs on themselves. Thresholds shrunk so a CPU-sized input counts as large."""
    _need("cpu")
    seen, timing = [], []
    launch = gn_mod.launch

    def recording_launch(plan, x3, *args):
        seen.append((plan, x3.data_ptr(), x3.stride()))
        if not timing:  # timed calls are only recorded: Triton's interpreter runs every program in Python
            return launch(plan, x3, *args)

    def fake_time(fn):
        timing.append(True)
        for _ in range(3):
            fn()
        timing.clear()
        return float(len(seen))

    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", fake_time)
    monkeypatch.setattr(gn_mod, "launch", recording_launch)
    shape = (1, 64, 32, 32)
    nbytes = 4 * 64 * 32 * 32
    for large, rotate_bytes, copies in ((False, 3 * nbytes, 1), (True, 3 * nbytes, 3), (True, nbytes, 2)):
        monkeypatch.setattr(gn_mod, "TUNED", {})
        monkeypatch.setattr(gn_mod, "LAST_FIRST_MIN_BYTES", nbytes if large else nbytes + 1)
        monkeypatch.setattr(gn_mod, "_ROTATE_BYTES", rotate_bytes)  # inputs in turn; at least two when large
        seen.clear()
        _group_norm_case(shape, 8, torch.float32, "cpu", channels_last=True)  # tunes, then runs the choice
        timed, (final_plan, _, _) = seen[:-1], seen[-1]
        assert {stride[1:] for _, _, stride in seen} == {(1, 64)}  # the copies keep channels-last
        assert any(p.last_first for p, _, _ in timed) == large
        ptrs = [ptr for _, ptr, _ in timed]
        assert len(set(ptrs)) == copies
        assert all(a != b for a, b in zip(ptrs, ptrs[1:])) == large  # a different input each call
        ((chosen, _),) = gn_mod.TUNED.values()
        assert final_plan == chosen


def test_group_norm_tuner_copies_keep_a_batch_strided_input_in_place(monkeypatch):
    """A batch-strided input (a channel slice of a wider tensor, out likewise) has the "nchw"
    layout, whose flat plan uses one batch stride for x and out: the timing copies must keep that
    stride, or the timed calls write outside `out` (a review's repro)."""
    _need("cpu")
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(tuning, "time_ms", lambda fn: (fn(), fn(), 1.0)[-1])
    monkeypatch.setattr(gn_mod, "TUNED", {})
    monkeypatch.setattr(gn_mod, "LAST_FIRST_MIN_BYTES", 0)
    big, big_out = torch.randn(2, 64, 16, 16), torch.full((2, 64, 16, 16), float("nan"))
    x, out = big[:, :32], big_out[:, :32]  # [2, 32, 16, 16], batch stride 64 * 256
    w, b = torch.randn(32), torch.randn(32)
    gn_mod.group_norm(x, 8, w, b, 1e-5, silu=True, out=out)
    _check(out, F.silu(F.group_norm(x.double(), 8, w.double(), b.double(), 1e-5)))
    assert torch.isnan(big_out[:, 32:]).all()  # nothing written past the slice


def test_time_ms_sizes_its_graph_and_divides_by_what_it_captured(monkeypatch):
    """The timer's sizing on the CPU, graphs and events stood in: each capture's GPU time per call
    falls (clocks ramping up), so the loop re-sizes three times; the result must be the last
    graph's time per call, divided by the calls that graph holds, not by the next size."""
    import contextlib
    import types

    per_call_ms = iter([0.0125, 0.005, 0.002])  # per capture
    graphs = []

    def capture(fn, calls):
        graphs.append(types.SimpleNamespace(calls=calls, per_call=next(per_call_ms)))
        return graphs[-1]

    monkeypatch.setattr(tuning, "_capture", capture)
    monkeypatch.setattr(tuning, "_replay_ms", lambda g: g.calls * g.per_call)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(synchronize=lambda: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    calls = []
    assert tuning.time_ms(lambda: calls.append(1), target_ms=1.0) == pytest.approx(0.002)
    assert [g.calls for g in graphs] == [8, 80, 200] and len(calls) == 1  # sized from 8 x 12.5 us, then 80 x 5 us
    graphs.clear()
    per_call_ms = iter([0.1])  # 8 calls of 0.1 ms: 0.8 ms, long enough at once
    assert tuning.time_ms(lambda: None, target_ms=1.0) == pytest.approx(0.1) and len(graphs) == 1


def test_time_ms_measures_gpu_time_in_graphs():
    """The plan timer: graph replays sized by GPU time, per-call median. A spin kernel of 4x the
    cycles must time about 4x; both well above zero. The least of three timings each, and wide
    bounds: device_check runs the CUDA tests in 12 processes sharing the GPU."""
    _need("cuda")
    short = min(tuning.time_ms(lambda: torch.cuda._sleep(20_000)) for _ in range(3))  # ~10 us at ~2 GHz
    long = min(tuning.time_ms(lambda: torch.cuda._sleep(80_000)) for _ in range(3))
    assert short > 0.002 and 2.5 < long / short < 6.0, (short, long)


def test_auto_mode_runs_the_attention_that_timed_faster(monkeypatch):
    """ops.attention in "auto" mode on a (stand-in) CUDA tensor: the Triton kernel and torch's SDPA
    each timed once per shape (the kernel's own tuning first), the faster one run from then on;
    "triton" mode never asks."""
    _need("cpu")
    import fastdiff.ops as ops

    monkeypatch.setattr(ops, "_use_triton", lambda x: True)  # as for a CUDA tensor
    monkeypatch.setattr(tuning, "can_time", lambda device: True)
    monkeypatch.setattr(ops, "ATTENTION_CHOICE", {})
    q, k, v = (torch.randn(1, 2, 33, 40) for _ in range(3))
    kernel_out, sdpa_out = attn_mod.attention(q, k, v, 0.2), ops.attention_ref(q, k, v, 0.2)
    assert not torch.equal(kernel_out, sdpa_out)  # rounding differs, so the result tells which ran
    for faster in ("torch", "triton"):
        ops.ATTENTION_CHOICE.clear()
        timed = []

        def fake_time(fn, faster=faster, timed=timed):
            out = fn()  # the candidate with the model's reshape after it
            assert out.shape == (1, 33, 80)
            name = ("triton", "torch")[len(timed)]  # fastest() times in dict order
            timed.append(name)
            return 1.0 if name == faster else 2.0

        monkeypatch.setattr(tuning, "time_ms", fake_time)
        with ops.kernels("auto"):
            for _ in range(2):  # the second call reuses the choice
                out = ops.attention(q, k, v, 0.2)
                assert torch.equal(out, sdpa_out if faster == "torch" else kernel_out)
        assert timed == ["triton", "torch"]
        ((choice, times),) = ops.ATTENTION_CHOICE.values()
        assert choice == faster and set(times) == {"triton", "torch"}
    ops.ATTENTION_CHOICE.clear()
    with ops.kernels("triton"):
        assert torch.equal(ops.attention(q, k, v, 0.2), kernel_out) and not ops.ATTENTION_CHOICE


# ----------------------------------------------------------------------------------------------
# GEGLU


def _geglu_case(shape, dtype, device):
    scale = 0.4 if dtype == torch.bfloat16 else 1.0  # keeps |x * gelu(gate)| < 4 for bf16
    h = (scale * torch.randn(shape, device=device)).to(dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), device=device, dtype=dtype)
    geglu_mod.geglu(h, out=out)
    x, gate = h.double().chunk(2, dim=-1)
    _check(out, x * F.gelu(gate))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_geglu_cpu(dtype):
    """inner 1280 (SD's smallest) over 3 x 7 rows: column and row tails both masked."""
    _need("cpu")
    _geglu_case((3, 7, 2 * 1280), dtype, "cpu")


def test_geglu_cpu_odd_inner_and_strided_rows():
    _need("cpu")
    h = torch.randn(5, 2 * 2 * 100)[:, : 2 * 100]  # rows of a wider buffer: row stride 400
    out = geglu_mod.geglu(h)
    x, gate = h.double().chunk(2, dim=-1)
    _check(out, x * F.gelu(gate))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_geglu_gelu_accuracy_over_the_whole_range(device):
    """The kernel's own erf (Abramowitz & Stegun 7.1.26, with the GPU's approximate rsqrt and
    exp2) against float64 across [-12, 12], at 0, at tiny and huge gates, where randn inputs
    never go: within 1e-6 (1 + |gate|), about torch's fp32 gelu error (9e-7)."""
    _need(device)
    g = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4])])
    h = torch.cat([torch.ones_like(g), g])[None].to(device)  # [1, 2N]: value 1, gate g
    out = torch.full((1, g.numel()), float("nan"), device=device)
    geglu_mod.geglu(h, out=out)
    ref = g.double() * 0.5 * (1 + torch.erf(g.double() / 2**0.5))
    err = (out[0].double().cpu() - ref).abs()
    assert (err <= 1e-6 * (1 + g.abs().double())).all(), f"max err {err.max():.3g} at gate {g[err.argmax()]:.4g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240), (2, 64, 10240)], ids=str)
def test_geglu_cuda(shape, dtype):
    _need("cuda")
    _geglu_case(shape, dtype, "cuda")


# ----------------------------------------------------------------------------------------------
# sm_90 builds (benchmarks/sm90_build.py): the CUDA path compiled, not run, on any machine, with the
# specialisation the JIT gives SD's shapes, so CPU-only CI still catches code the interpreter
# accepts but the compiler rejects, tile configs that spill registers, and a kernel that falls off
# Hopper's fast paths. Triton picks interpreted vs compiled per process, so it runs as a child.

SM90_OTHER_KERNELS = (
    ["attention_d8_unaligned"]
    + [f"group_norm_{k}_{l}" for k in ("stats", "apply", "fused") for l in ("nchw", "nhwc", "nchw_c1")]
    + [f"group_norm_nhwc_{k}" for k in ("stats", "finalize", "apply")]
    + ["group_norm_flat_apply"]
    + ["geglu"]
)


@pytest.fixture(scope="module")
def sm90_builds() -> dict:
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sm90_build.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    child = subprocess.run([sys.executable, str(script), "--json"], env=env, capture_output=True, text=True, timeout=600)
    if child.returncode == 3:
        pytest.skip(child.stdout.strip().splitlines()[-1])
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def test_builds_for_sm90_without_spills(sm90_builds):
    """Every kernel, and attention in every tile config the autotuner keeps at SD's shapes."""
    attention = [n for n in sm90_builds if n.startswith("attention_d") and n != "attention_d8_unaligned"]
    for D in (40, 80):  # padded, split, and padded with scores a tile ahead: all built
        kinds = {("_split" in n, "_overlap" in n) for n in attention if n.startswith(f"attention_d{D}_")}
        assert kinds == {(False, False), (True, False), (False, True)}, f"D={D}: {kinds}"
    assert any("_split" in n for n in attention if n.startswith("attention_d160_"))
    assert set(SM90_OTHER_KERNELS) <= set(sm90_builds)
    spills = {n: r["stack"] for n, r in sm90_builds.items() if r["stack"]}
    assert not spills, f"bytes of register spills per thread: {spills}"


def test_sm90_attention_uses_warpgroup_mma(sm90_builds):
    """Both matmuls on Hopper's wgmma (HGMMA in SASS) wherever the tile has the 64 rows it needs;
    the older HMMA path would cap the kernel below what SDPA's own kernels reach."""
    wide = {n: r["sass"] for n, r in sm90_builds.items() if n.startswith("attention") and r["meta"]["BLOCK_M"] >= 64}
    assert len(wide) >= 10
    bad = {n: sass for n, sass in wide.items() if sass.get("HGMMA", 0) == 0 or sass.get("HMMA", 0)}
    assert not bad, bad


def test_sm90_overlap_puts_softmax_under_the_next_matmul(sm90_builds):
    """OVERLAP_QK's point, read from SASS: exp2s issued while the next tile's wgmma is in flight.
    The plain loop waits for q k^T before any exp2; a compiler change that undid the overlap fails."""
    attention = {n: r for n, r in sm90_builds.items() if n.startswith("attention_d") and n != "attention_d8_unaligned"}
    overlap = {n: r["ex2_under_wgmma"] for n, r in attention.items() if n.endswith("_overlap_even")}
    plain = {n: r["ex2_under_wgmma"] for n, r in attention.items() if "_overlap" not in n}
    assert len(overlap) >= 4 and all(v >= 8 for v in overlap.values()), overlap  # of 32-64 per tile
    assert not any(plain.values()), {n: v for n, v in plain.items() if v}


@pytest.mark.parametrize(
    "name",
    ["geglu", "group_norm_stats_nchw", "group_norm_apply_nchw", "group_norm_fused_nchw"]
    + ["group_norm_nhwc_stats", "group_norm_nhwc_apply", "group_norm_flat_apply", "group_norm_stats_nchw_c1"]
    + ["group_norm_apply_nchw_r", "group_norm_nhwc_apply_r", "group_norm_flat_apply_r"],  # the last-first passes
)
def test_sm90_memory_bound_kernels_move_16_byte_vectors(sm90_builds, name):
    """The bulk of the bytes move as 16-byte loads (and, for geglu, stores): the memory-bound
    kernels cannot approach copy bandwidth otherwise. (The per-group NHWC GroupNorm kernels with 10
    channels per group cannot: a group's channels are 20 bytes, 4-byte aligned; the channels-last
    plan's blocks of 64 channels are 128 bytes.)"""
    sass = sm90_builds[name]["sass"]
    assert sass.get("LDG.E.128", 0) > 0, sass
    if "stats" not in name:  # the statistics kernels store a few fp32 values per program
        assert sass.get("STG.E.128", 0) > 0, sass


def test_sm90_geglu_issues_few_instructions_per_element(sm90_builds):
    """GEGLU moves 6 bytes per output; at copy bandwidth an SM must retire ~2.7 outputs a cycle, so
    at libdevice's erf (40 SASS instructions per element: 108 of the 128 lanes' issue slots a
    cycle) the kernel was issue-bound, and run 2 measured it at 51-56% of copy. The kernel's own
    erf brings it to about 22 per element; a change that brings back a division's range checks
    or a denormal fix-up shows here."""
    r = sm90_builds["geglu"]
    per_thread = r["meta"]["BLOCK_M"] * r["meta"]["BLOCK_N"] // (32 * r["meta"]["num_warps"])
    assert r["instructions"] / per_thread <= 26, (r["instructions"], per_thread)


# ----------------------------------------------------------------------------------------------
# benchmarks/kernel_bench.py's table code, on the CPU: interpreted kernels, wall-clock timers in place
# of the CUDA-graph ones, tiny shapes. A GPU run costs minutes of a scarce loan; a typo in the
# row code must not be found there.


def test_kernels_benchmark_rows_on_cpu(monkeypatch, capsys):
    _need("cpu")
    import time

    from fastdiff import testing

    bench = testing.load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py")

    def wall_ms(fn, calls=1, reps=1):  # one call, no warm-up: the interpreter runs each the same
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000 / calls

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "bench_graph", wall_ms)
    monkeypatch.setattr(bench, "bench", wall_ms)
    monkeypatch.setattr(bench, "_gpu_kernel_names", lambda fn: "cpu")
    monkeypatch.setattr(bench, "n_sets", lambda nbytes: 2)
    monkeypatch.setattr(bench, "ATTENTION_SHAPES", [(1, 2, 40, 40, 40), (1, 2, 33, 77, 80)])
    monkeypatch.setattr(bench, "GROUP_NORM_SHAPES", [(1, 64, 5, 7)])
    monkeypatch.setattr(bench, "VAE_GROUP_NORM_SHAPES", [(1, 32, 9, 9)])
    monkeypatch.setattr(bench, "GEGLU_SHAPES", [(1, 5, 96)])
    monkeypatch.setattr(bench, "LAYER_NORM_SHAPES", [(1, 9, 64)])
    dtype = torch.float16
    rows = [*bench.run_attention(dtype), *bench.run_group_norm(dtype), *bench.run_geglu(dtype)]
    rows += [*bench.run_layer_norm(dtype), *bench.run_group_norm_vae(dtype)]
    assert [r["kernel"] for r in rows] == ["attention"] * 2 + ["group_norm+silu"] * 2 + ["geglu", "layer_norm"] + ["group_norm+silu"] * 2
    assert [r["shape"] for r in rows[-2:]] == ["[1, 32, 9, 9] nchw", "[1, 32, 9, 9] nhwc"]
    for r in rows:
        assert r["torch_ms"] > 0 and r["torch_rate"] > 0, r
        if r["kernel"] != "layer_norm":  # the others compare the kernel with torch on the same inputs
            assert r["triton_ms"] > 0 and r["max_abs_diff"] < 2e-2, r
        if r["unit"] == "GB/s":
            assert r["ceiling"] > 0, r
    assert rows[0]["config"].startswith("32x32 w4 s1")  # the interpreter's one config
    overlap = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_D": False, "OVERLAP_QK": True}, num_warps=8, num_stages=3)
    assert bench._config_name(overlap) == "128x64 w8 s3 overlap"  # not the same name as its plain twin
    bench.print_header()
    for r in rows:
        bench.finish_row(r, {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    assert all(r["of_ceiling"] > 0 for r in rows)
    # The goal lines: counted per kernel, worst row named.
    fake = [
        dict(kernel="attention", shape="a", speedup=1.2, of_ceiling=0.5),
        dict(kernel="attention", shape="b", speedup=0.78, of_ceiling=0.5),
        dict(kernel="group_norm+silu", shape="c", speedup=3.0, of_ceiling=0.72),
    ]
    # A step cut at its time limit (SIGTERM from `timeout`) still prints the goal lines so far.
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda: "fake")
    monkeypatch.setattr(bench, "ceilings", lambda dtype: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    monkeypatch.setattr(bench, "finish_row", lambda r, ceil: None)
    monkeypatch.setattr(bench, "run_attention", lambda dtype: iter(fake[:2]))

    def cut(dtype):
        yield fake[2]
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
        yield fake[2]

    monkeypatch.setattr(bench, "run_group_norm", cut)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            bench.main(["--only", "attention", "--only", "group_norm"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.value.code == 124
    assert bench.goal_lines(fake)[1] in capsys.readouterr().out
    assert bench.goal_lines(fake) == [
        "goal attention >= 1.00x SDPA: 1/2 shapes met; worst 0.78x SDPA at b",
        "goal group_norm+silu >= 70% of copy: 1/1 shapes met; worst 72% of copy at c",
    ]
