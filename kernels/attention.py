"""Flash-attention forward: softmax(q k^T * scale) v in one pass over K/V.

Each program owns BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N-row tiles,
keeping a running row maximum and row sum (online softmax), so the [Sq, Sk] score matrix never
reaches memory. Scores, softmax statistics and the output accumulator are fp32; the probabilities
are cast back to the input dtype for the second matmul, as in FlashAttention-2. exp2 replaces exp,
with log2(e) folded into the softmax scale.

SD1.5 head dims (40, 80, 160) are not powers of two: the head-dim axis of every tile is padded to
the next power of two and the padding lanes are masked on load and store. A D = 40 row is 80 bytes,
so the compiler cannot prove 16-byte alignment from the strides alone; the launcher checks that
they are multiples of 8 elements and passes that on (STRIDE_ALIGN), which is what turns the loads
into 16-byte asynchronous copies (and, measured in sm_90 builds, removes register spills).

Tile sizes are autotuned on the first call for each (Sq, Sk, D, dtype); make that call before
capturing a CUDA graph.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Head dims above this run through torch's SDPA instead: the only such case in SD1.5 is the VAE
# mid-block (one head of 512 channels, once per decode), whose [BLOCK_M, 512] fp32 accumulator does
# not fit in registers at a useful BLOCK_M.
MAX_HEAD_DIM = 256

_LOG2E = 1.4426950408889634
# fp32 inputs get true fp32 matmuls (Triton would otherwise use TF32); 16-bit inputs ignore the flag.
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


def _configs():
    if triton.knobs.runtime.interpret:
        # The CPU interpreter (tests): one small config, so several K/V tiles and tails get exercised.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 32, 8, 3),
            (64, 64, 4, 3),
            (64, 32, 4, 3),
            (64, 64, 8, 2),
            (64, 32, 8, 2),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tile sizes that fit the sequences and the padded head dim on an H100/H200-class
    GPU: the fp32 accumulator within 64 registers per thread, Q plus the pipelined K/V tiles
    within 200 KiB of shared memory. fp32 inputs run on CUDA cores (for checking more than for
    speed) and spill registers at anything but the smallest tiles."""
    d = kwargs["HEAD_DIM_P2"]
    itemsize = named_args["Q"].element_size()
    # Tiles longer than the sequence (down to 64 rows) only add masked work and compile time.
    max_m = max(64, triton.next_power_of_2(named_args["SEQ_Q"]))
    max_n = max(32, triton.next_power_of_2(named_args["SEQ_K"]))

    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        registers = bm * d // (32 * c.num_warps)
        smem = itemsize * (bm * d + 2 * c.num_stages * bn * d)
        short = bm <= max_m and bn <= max_n
        return short and registers <= 64 and smem <= 200 * 1024 and (itemsize < 4 or bm * bn <= 64 * 32)

    return [c for c in configs if fits(c)] or configs[-1:]  # the last config is the smallest


@triton.autotune(
    configs=_configs(),
    key=["SEQ_Q", "SEQ_K", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.heuristics({"EVEN_N": lambda args: args["SEQ_K"] % args["BLOCK_N"] == 0})
@triton.jit
def _attention_kernel(
    Q,  # [B, H, SEQ_Q, HEAD_DIM] queries, any strides
    K,  # [B, H, SEQ_K, HEAD_DIM] keys, any strides
    V,  # [B, H, SEQ_K, HEAD_DIM] values, any strides
    Out,  # [B, H, SEQ_Q, HEAD_DIM] output, any strides, dtype of Q
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides in elements: batch, head, token, dim
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_ob, stride_oh, stride_om, stride_od,  # Out strides
    num_heads,  # H: splits program_id(1) into (batch, head)
    SEQ_Q,  # query tokens
    SEQ_K,  # key/value tokens
    qk_scale,  # softmax scale * log2(e): scores come out in the exp2 domain
    HEAD_DIM: tl.constexpr,  # true head dim D
    HEAD_DIM_P2: tl.constexpr,  # D padded to a power of two (>= 16) for tl.arange / tl.dot
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); 16-bit inputs ignore it
    STRIDE_ALIGN: tl.constexpr,  # divides every batch, head and token stride (8, else 1)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key/value rows per loop step
    EVEN_N: tl.constexpr,  # SEQ_K % BLOCK_N == 0: no key-tail masking needed
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows
    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows within a tile
    offs_d = tl.arange(0, HEAD_DIM_P2)  # [HEAD_DIM_P2] padded head dim
    mask_m = offs_m < SEQ_Q
    mask_d = offs_d < HEAD_DIM

    # Element offsets of each (batch, head) slice and of each row. The launcher checked that
    # STRIDE_ALIGN divides the strides; saying so lets rows of D = 40 (80 bytes in fp16) load as
    # 16-byte vectors.
    q_off = tl.multiple_of(off_b * stride_qb + off_h * stride_qh, STRIDE_ALIGN)
    k_off = tl.multiple_of(off_b * stride_kb + off_h * stride_kh, STRIDE_ALIGN)
    v_off = tl.multiple_of(off_b * stride_vb + off_h * stride_vh, STRIDE_ALIGN)
    o_off = tl.multiple_of(off_b * stride_ob + off_h * stride_oh, STRIDE_ALIGN)
    q_rows = tl.multiple_of(offs_m * stride_qm, STRIDE_ALIGN)  # [BLOCK_M]
    k_rows = tl.multiple_of(offs_n * stride_kn, STRIDE_ALIGN)  # [BLOCK_N]
    v_rows = tl.multiple_of(offs_n * stride_vn, STRIDE_ALIGN)  # [BLOCK_N]
    o_rows = tl.multiple_of(offs_m * stride_om, STRIDE_ALIGN)  # [BLOCK_M]

    q_ptrs = Q + q_off + q_rows[:, None] + offs_d[None, :] * stride_qd  # [BLOCK_M, HEAD_DIM_P2]
    k_ptrs = K + k_off + k_rows[:, None] + offs_d[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM_P2]
    v_ptrs = V + v_off + v_rows[:, None] + offs_d[None, :] * stride_vd  # [BLOCK_N, HEAD_DIM_P2]

    # Rows past SEQ_Q load zeros; they compute harmless values and are never stored.
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_P2]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (exp2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)  # running sum of p @ v

    for start_n in range(0, SEQ_K, BLOCK_N):
        mask_n = (start_n + offs_n) < SEQ_K
        if EVEN_N:
            k = tl.load(k_ptrs, mask=mask_d[None, :], other=0.0)  # [BLOCK_N, HEAD_DIM_P2]
            v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if not EVEN_N:
            qk = tl.where(mask_n[None, :], qk, float("-inf"))

        # Every tile holds at least one real key, so m_new is finite and alpha is well defined.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    acc = acc / l_i[:, None]
    o_ptrs = Out + o_off + o_rows[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@functools.lru_cache(maxsize=None)
def _head_dim_p2(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def attention(q, k, v, scale: float | None = None, *, out=None):
    """softmax(q k^T * scale) v for q [B, H, Sq, D], k/v [B, H, Sk, D]; any strides, no mask.

    scale defaults to 1/sqrt(D). fp16, bf16 and fp32 (fp32 matmuls without TF32).
    The result is a [B, H, Sq, D] view of a [B, Sq, H, D] buffer, so the usual
    `.transpose(1, 2).reshape(B, Sq, H * D)` that follows is free. `out` (optional, any strides)
    receives the result instead.
    Head dims above MAX_HEAD_DIM (the VAE's 512) fall back to F.scaled_dot_product_attention.
    """
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if D > MAX_HEAD_DIM:
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return ref if out is None else out.copy_(ref)
    if out is None:
        out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, H, Sq, D]

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)

    # Batch, head and token strides all multiples of 8 (true for SD's packed projections) let the
    # kernel load rows as 16-byte vectors even when D = 40 gives them no larger power-of-two factor.
    align = 8 if all(s % 8 == 0 for t in (q, k, v, out) for s in t.stride()[:3]) else 1
    _attention_kernel[grid](
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Sq, Sk, scale * _LOG2E,
        HEAD_DIM=D, HEAD_DIM_P2=_head_dim_p2(D), DOT_PRECISION=_DOT_PRECISION[q.dtype], STRIDE_ALIGN=align,
    )  # fmt: skip
    return out
