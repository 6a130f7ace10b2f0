"""GEGLU: x * gelu(gate) with (x, gate) = h.chunk(2, -1), in one pass reading h once.

The torch version reads h for the chunk views, writes gelu(gate), then reads both again for the
product; here each program loads a [BLOCK_M, BLOCK_N] tile of both halves and writes the product.
gelu is the erf form (F.gelu's default) in fp32, its erf to 1.5e-7 by a short formula (`_phi`)
rather than libdevice's, whose instruction count bounded the kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import Launch

_TILE = 4096  # output elements per program
_NUM_WARPS = 8  # 16 elements per thread


@triton.jit
def _phi(g):
    """Phi(g), the standard normal CDF (gelu(g) = g * Phi(g)), as 1 - q or q with
    q = erfc(|g| / sqrt(2)) / 2 by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7 in erf):
    t = 1 / (1 + p z), erfc(z) = t (a1 + a2 t + ... + a5 t^4) exp(-z^2), z = |g| / sqrt(2).

    Written for the instruction count, which bounds this memory-bound kernel on sm_90 (libdevice's
    erf made it 40 SASS instructions per element, near the issue rate copy bandwidth needs):
    1/sqrt(2) is folded into p, the 1/2 into the a_i, and 1 / (1 + p z) is rsqrt(.)^2, a plain
    MUFU for an argument >= 1, where a division adds range checks."""
    r = tl.math.rsqrt(1.0 + 0.2316418882663604 * tl.abs(g))  # p / sqrt(2), p = 0.3275911
    t = r * r
    # a_i / 2 for a = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
    poly = 0.127414796 + t * (-0.142248368 + t * (0.7107068705 + t * (-0.7265760135 + t * 0.5307027145)))
    q = t * poly * tl.math.exp2(g * g * -0.7213475204444817)  # exp(-g^2 / 2) = 2^(-g^2 log2(e) / 2)
    return tl.where(g >= 0, 1.0 - q, q)


@triton.jit
def _geglu_kernel(
    H,  # [M, 2 * N] input rows: value half then gate half; last dim contiguous
    Out,  # [M, N] output, contiguous, dtype of H
    stride_hm,  # H row stride in elements
    M,  # rows (all leading dims flattened)
    N,  # inner size: half of h's last dim
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per program
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)

    x_ptrs = H + offs_m[:, None] * stride_hm + offs_n[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptrs + N, mask=mask, other=0.0).to(tl.float32)
    gelu = gate * _phi(gate)
    tl.store(Out + offs_m[:, None] * N + offs_n[None, :], (x * gelu).to(Out.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _plan(inner: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for one inner size: wide rows first, then enough rows to fill _TILE."""
    block_n = min(triton.next_power_of_2(inner), 1024)
    return _TILE // block_n, block_n


def launches(h2, out) -> list[Launch]:
    """The call that writes geglu of h2 ([M, 2 * inner], unit column stride) into out ([M, inner],
    contiguous), not run."""
    M, N = h2.shape[0], h2.shape[1] // 2
    block_m, block_n = _plan(N)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_NUM_WARPS)
    return [Launch(_geglu_kernel, grid, (h2, out, h2.stride(0), M, N), meta)]


def geglu(h, *, out=None):
    """x * gelu(gate) where (x, gate) = h.chunk(2, -1); h [..., 2 * inner] -> [..., inner].

    `out` (optional, contiguous [..., inner]) receives the result instead.
    """
    two_n = h.shape[-1]
    assert two_n % 2 == 0, f"GEGLU needs an even last dim, got {two_n}"
    h2 = h.reshape(-1, two_n)  # [M, 2N]; a view for the usual contiguous h
    if h2.stride(1) != 1:
        h2 = h2.contiguous()
    if out is None:
        out = torch.empty((*h.shape[:-1], two_n // 2), device=h.device, dtype=h.dtype)
    assert out.is_contiguous(), "geglu: out must be contiguous"
    for call in launches(h2, out.view(h2.shape[0], two_n // 2)):  # [M, N]
        call()
    return out
