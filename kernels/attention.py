"""Flash-attention forward: softmax(q k^T * scale) v in one pass over K/V.

Each program owns BLOCK_M query rows of one (batch, head) and streams K/V in BLOCK_N-row tiles,
keeping a running row maximum and row sum (online softmax), so the [Sq, Sk] score matrix never
reaches memory. Scores, softmax statistics and the output accumulator are fp32; the probabilities
are cast back to the input dtype for the second matmul, as in FlashAttention-2. exp2 replaces exp,
with log2(e) folded into the softmax scale.

SD1.5 head dims (40, 80, 160) are not powers of two, and tl.dot needs power-of-two tiles. Two ways
are autotuned per shape: pad the head-dim axis to the next power of two (D = 40 -> 64, masked on
load and store), or split it into two power-of-two parts (SPLIT_D: 40 = 32 + 16 with 8 masked,
80 = 64 + 16, 160 = 128 + 32), each matmul done as two, which cuts the padded lanes from 60% of D
to 20% (D = 40) or none (80, 160) at the cost of smaller MMA shapes. A D = 40 row is 80 bytes, so
the compiler cannot prove 16-byte alignment from the strides alone; the launcher checks that they
are multiples of 8 elements and passes that on (STRIDE_ALIGN), which is what turns the loads into
16-byte asynchronous copies (and, measured in sm_90 builds, removes register spills).

OVERLAP_QK (also autotuned) software-pipelines the key loop by hand: each step issues the next
tile's q k^T before this tile's softmax, so on Hopper the asynchronous wgmma runs while the exp2
units work (sm_90 SASS shows the HGMMAs interleaved with MUFU.EX2 and the wait after them), the
overlap FlashAttention-3 gets within a warpgroup; it costs a second tile of scores in registers.

Short query sequences leave SMs idle (256 queries x 16 heads make 64 programs of 64 rows for an
H200's 132 SMs): the launcher can split the key axis into chunks, one per program_id(2), whose
programs write unnormalised partial results that `_attention_combine_kernel` merges, as
FlashDecoding does. Whether to split, and into how many chunks, is timed per shape at the first
CUDA call (`_tuned_splits`).

Tile sizes, the head-dim split and the overlap are autotuned on the first call for each
(Sq, Sk, D, dtype), and the choice is kept in Triton's on-disk cache; make that call before
capturing a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import tuning
from .launch import Launch

# Head dims above this run through torch's SDPA instead: the only such case in SD1.5 is the VAE
# mid-block (one head of 512 channels, once per decode), whose [BLOCK_M, 512] fp32 accumulator does
# not fit in registers at a useful BLOCK_M.
MAX_HEAD_DIM = 256

_LOG2E = 1.4426950408889634
# fp32 inputs get true fp32 matmuls (Triton would otherwise use TF32); 16-bit inputs ignore the flag.
_DOT_PRECISION = {torch.float32: "ieee", torch.float16: "tf32", torch.bfloat16: "tf32"}


def configs():
    if triton.knobs.runtime.interpret:
        # The CPU interpreter (tests): one small config, so several K/V tiles and tails get exercised.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "SPLIT_D": False, "OVERLAP_QK": False}, num_warps=4, num_stages=1)]
    # Run 2 on an H200 chose among these at SD's shapes; 128 x 64 w4 and 128 x 32 w8 never won.
    padded = [
        (128, 64, 8, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 3),
        (64, 32, 4, 3),
        (64, 64, 8, 2),
        # 32-row tiles: twice the programs for short sequences (256 queries x 16 heads = 64 programs
        # of 64 rows on 132 SMs); below wgmma's 64 rows, so these use the older mma, whose operands
        # live in registers: 32 x 64 tiles spilled at D = 80 in sm_90 builds.
        (32, 32, 4, 2),
        (64, 32, 8, 2),  # last: the smallest, the fallback when nothing else fits
    ]
    # Split head dim: wgmma tiles only (a 32-row split tile spilled registers at D = 160).
    split = [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2)]
    # Next tile's q k^T in flight during this tile's softmax (long key sequences only, see the
    # prune). Padded head dim and one warpgroup per 64 rows only: in sm_90 builds the split head
    # dim waited after every wgmma, and 64 rows over 8 warps waited before the first exp2.
    overlap = [(128, 64, 8, 3), (64, 64, 4, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_D": sd, "OVERLAP_QK": ov}, num_warps=w, num_stages=s)
        for sd, ov, tiles in ((False, True, overlap), (True, False, split), (False, False, padded))
        for bm, bn, w, s in tiles
    ]


def head_dim_parts(head_dim: int, split: bool) -> tuple[int, int]:
    """(A, B): the head dim as tiles of A + B lanes, both powers of two (B = 0: one tile of A).
    Unsplit, A is D padded to a power of two (>= 16, tl.dot's minimum); split, A is the largest
    power of two below D and B covers the rest, padded."""
    padded = max(16, triton.next_power_of_2(head_dim))
    if not split or padded == head_dim or head_dim <= 16:
        return padded, 0
    return padded // 2, max(16, triton.next_power_of_2(head_dim - padded // 2))


def prune_configs(configs, named_args, **kwargs):
    """Keep the tile sizes that fit the sequences and the head dim on an H100/H200-class GPU: the
    fp32 accumulator within 64 registers per thread, Q plus the pipelined K/V tiles within 200 KiB
    of shared memory. A split head dim only where D is not a power of two, scores a tile ahead only
    over at least 4 key tiles per program. fp32 inputs run on CUDA cores (for checking more than
    for speed) and spill registers at anything but the smallest tiles: neither variant for them."""
    head_dim = kwargs["HEAD_DIM"]
    itemsize = named_args["Q"].element_size()
    # Tiles longer than the sequence (down to 64 rows) only add masked work and compile time.
    max_m = max(64, triton.next_power_of_2(named_args["SEQ_Q"]))
    max_n = max(32, triton.next_power_of_2(named_args["SEQ_K"]))

    def fits(c):
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        a, b = head_dim_parts(head_dim, c.kwargs["SPLIT_D"])
        if c.kwargs["SPLIT_D"] and (b == 0 or itemsize == 4):
            return False
        chunk = named_args["SEQ_K"] // named_args.get("NUM_SPLITS", 1)  # keys per program
        if c.kwargs["OVERLAP_QK"] and (chunk < 4 * bn or itemsize == 4):
            return False  # a tile of scores ahead pays only over many key tiles
        d = a + b
        registers = bm * d // (32 * c.num_warps)
        smem = itemsize * (bm * d + 2 * c.num_stages * bn * d)
        short = bm <= max_m and bn <= max_n
        return short and registers <= 64 and smem <= 200 * 1024 and (itemsize < 4 or bm * bn <= 64 * 32)

    return [c for c in configs if fits(c)] or configs[-1:]  # the last config is the smallest


@triton.jit
def _scores(
    q_a,  # [BLOCK_M, HEAD_DIM_A] queries, head-dim lanes [0, A)
    q_b,  # [BLOCK_M, HEAD_DIM_B] lanes [A, A + B); unused when HEAD_DIM_B = 0
    k_a_ptrs,  # [BLOCK_N, HEAD_DIM_A] pointers of one key tile
    k_b_ptrs,  # [BLOCK_N, HEAD_DIM_B] the same for lanes [A, A + B); unused when HEAD_DIM_B = 0
    rows_ok,  # [BLOCK_N] key rows that exist (the others load as zeros); used when MASK_ROWS
    mask_a,  # [HEAD_DIM_A] real head-dim lanes
    mask_b,  # [HEAD_DIM_B] real head-dim lanes; unused when HEAD_DIM_B = 0
    MASK_ROWS: tl.constexpr,  # the tile may run past the last key
    HEAD_DIM_B: tl.constexpr,  # second head-dim part, 0 for none
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs; 16-bit inputs ignore it
):
    """q k^T for one key tile: [BLOCK_M, BLOCK_N] fp32, unscaled."""
    mask_ka = mask_a[None, :]
    if MASK_ROWS:
        mask_ka = rows_ok[:, None] & mask_ka
    k_a = tl.load(k_a_ptrs, mask=mask_ka, other=0.0)  # [BLOCK_N, HEAD_DIM_A]
    qk = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)
    if HEAD_DIM_B > 0:
        mask_kb = mask_b[None, :]
        if MASK_ROWS:
            mask_kb = rows_ok[:, None] & mask_kb
        k_b = tl.load(k_b_ptrs, mask=mask_kb, other=0.0)  # [BLOCK_N, HEAD_DIM_B]
        qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PRECISION)
    return qk


@triton.autotune(
    configs=configs(),
    key=["SEQ_Q", "SEQ_K", "HEAD_DIM", "NUM_SPLITS"],
    prune_configs_by={"early_config_prune": prune_configs},
    cache_results=True,
)
@triton.heuristics(
    {
        "EVEN_N": lambda args: args["SEQ_K"] % args["BLOCK_N"] == 0,
        "SPLIT_K": lambda args: args["NUM_SPLITS"] > 1,
        "HEAD_DIM_A": lambda args: head_dim_parts(args["HEAD_DIM"], args["SPLIT_D"])[0],
        "HEAD_DIM_B": lambda args: head_dim_parts(args["HEAD_DIM"], args["SPLIT_D"])[1],
    }
)
@triton.jit
def _attention_kernel(
    Q,  # [B, H, SEQ_Q, HEAD_DIM] queries, any strides
    K,  # [B, H, SEQ_K, HEAD_DIM] keys, any strides
    V,  # [B, H, SEQ_K, HEAD_DIM] values, any strides
    Out,  # [B, H, SEQ_Q, HEAD_DIM] output, any strides, dtype of Q
    Partials,  # [NUM_SPLITS, B * H, SEQ_Q, HEAD_DIM + 2] fp32 when SPLIT_K: unnormalised o, then m, l
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides in elements: batch, head, token, dim
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides
    stride_ob, stride_oh, stride_om, stride_od,  # Out strides
    num_heads,  # H: splits program_id(1) into (batch, head)
    SEQ_Q,  # query tokens
    SEQ_K,  # key/value tokens
    NUM_SPLITS,  # key-axis chunks, one per program_id(2); 1 = the whole key axis per program
    qk_scale,  # softmax scale * log2(e): scores come out in the exp2 domain
    HEAD_DIM: tl.constexpr,  # true head dim D
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32); 16-bit inputs ignore it
    STRIDE_ALIGN: tl.constexpr,  # divides every batch, head and token stride (8, else 1)
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key/value rows per loop step
    SPLIT_D: tl.constexpr,  # head dim as two power-of-two parts (see HEAD_DIM_A/B), not one padded
    OVERLAP_QK: tl.constexpr,  # issue the next key tile's q k^T before this tile's softmax
    EVEN_N: tl.constexpr,  # SEQ_K % BLOCK_N == 0: no key-tail masking needed
    SPLIT_K: tl.constexpr,  # NUM_SPLITS > 1: write partial results for _attention_combine_kernel
    HEAD_DIM_A: tl.constexpr,  # lanes [0, A) of the head dim: a power of two >= 16 (D padded if B = 0)
    HEAD_DIM_B: tl.constexpr,  # lanes [A, A + B) when SPLIT_D, a power of two >= 16; 0 otherwise
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)

    # This program's keys: whole tiles [kv_start, kv_end), the last chunk possibly empty. Unsplit,
    # the bounds stay literal (a computed start changed the loop's schedule in sm_90 builds).
    kv_start = 0
    kv_end = SEQ_K
    if SPLIT_K:
        tiles_per_split = tl.cdiv(tl.cdiv(SEQ_K, BLOCK_N), NUM_SPLITS)
        kv_start = pid_s * tiles_per_split * BLOCK_N
        kv_end = tl.minimum(kv_start + tiles_per_split * BLOCK_N, SEQ_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows
    offs_n = kv_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows of the first tile
    offs_a = tl.arange(0, HEAD_DIM_A)  # [HEAD_DIM_A] first part of the head dim
    mask_m = offs_m < SEQ_Q
    mask_a = offs_a < HEAD_DIM

    # Element offsets of each (batch, head) slice and of each row. The launcher checked that
    # STRIDE_ALIGN divides the strides; saying so lets rows of D = 40 (80 bytes in fp16) load as
    # 16-byte vectors.
    q_off = tl.multiple_of(off_b * stride_qb + off_h * stride_qh, STRIDE_ALIGN)
    k_off = tl.multiple_of(off_b * stride_kb + off_h * stride_kh, STRIDE_ALIGN)
    v_off = tl.multiple_of(off_b * stride_vb + off_h * stride_vh, STRIDE_ALIGN)
    o_off = tl.multiple_of(off_b * stride_ob + off_h * stride_oh, STRIDE_ALIGN)
    q_rows = Q + q_off + tl.multiple_of(offs_m * stride_qm, STRIDE_ALIGN)[:, None]  # [BLOCK_M, 1]
    k_rows = K + k_off + tl.multiple_of(offs_n * stride_kn, STRIDE_ALIGN)[:, None]  # [BLOCK_N, 1]
    v_rows = V + v_off + tl.multiple_of(offs_n * stride_vn, STRIDE_ALIGN)[:, None]  # [BLOCK_N, 1]
    o_rows = Out + o_off + tl.multiple_of(offs_m * stride_om, STRIDE_ALIGN)[:, None]  # [BLOCK_M, 1]

    # Rows past SEQ_Q load zeros; they compute harmless values and are never stored.
    q_a = tl.load(q_rows + offs_a[None, :] * stride_qd, mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    k_a_ptrs = k_rows + offs_a[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM_A]
    v_a_ptrs = v_rows + offs_a[None, :] * stride_vd  # [BLOCK_N, HEAD_DIM_A]
    acc_a = tl.zeros([BLOCK_M, HEAD_DIM_A], dtype=tl.float32)  # running sum of p @ v, lanes [0, A)
    if HEAD_DIM_B > 0:
        offs_b = HEAD_DIM_A + tl.arange(0, HEAD_DIM_B)  # [HEAD_DIM_B] second part of the head dim
        mask_b = offs_b < HEAD_DIM
        q_b = tl.load(q_rows + offs_b[None, :] * stride_qd, mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        k_b_ptrs = k_rows + offs_b[None, :] * stride_kd  # [BLOCK_N, HEAD_DIM_B]
        v_b_ptrs = v_rows + offs_b[None, :] * stride_vd  # [BLOCK_N, HEAD_DIM_B]
        acc_b = tl.zeros([BLOCK_M, HEAD_DIM_B], dtype=tl.float32)  # lanes [A, A + B)
    else:  # placeholders for _scores' unused arguments
        mask_b = mask_a
        q_b = q_a
        k_b_ptrs = k_a_ptrs

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (exp2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2(score - m_i)

    offs_n = tl.arange(0, BLOCK_N)  # [BLOCK_N] key rows within a tile, from here on
    if OVERLAP_QK:  # scores of the first key tile; each step then starts the next tile's
        first_ok = (kv_start + offs_n) < SEQ_K
        qk_next = _scores(q_a, q_b, k_a_ptrs, k_b_ptrs, first_ok, mask_a, mask_b, True, HEAD_DIM_B, DOT_PRECISION)
    for start_n in range(kv_start, kv_end, BLOCK_N):
        mask_n = (start_n + offs_n) < SEQ_K
        k_a_ptrs += BLOCK_N * stride_kn
        if HEAD_DIM_B > 0:
            k_b_ptrs += BLOCK_N * stride_kn
        if OVERLAP_QK:
            # The next tile's q k^T (all-masked past the last key) goes to the tensor cores now,
            # so they work while this tile's exp2s run; qk is this tile's, started one step ago.
            qk = qk_next
            next_ok = (start_n + BLOCK_N + offs_n) < kv_end  # not into the next chunk's keys
            qk_next = _scores(q_a, q_b, k_a_ptrs, k_b_ptrs, next_ok, mask_a, mask_b, True, HEAD_DIM_B, DOT_PRECISION)
        else:
            qk = _scores(
                q_a, q_b, k_a_ptrs - BLOCK_N * stride_kn, k_b_ptrs - BLOCK_N * stride_kn, mask_n, mask_a, mask_b,
                not EVEN_N, HEAD_DIM_B, DOT_PRECISION,
            )  # fmt: skip
        if not EVEN_N:
            qk = tl.where(mask_n[None, :], qk, float("-inf"))

        # Scores in the exp2 domain are qk * qk_scale (> 0, so the row max commutes with it); the
        # scaling rides in one FMA per score. Every tile in the loop holds at least one real key,
        # so m_new is finite and alpha is well defined.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        mask_va = mask_a[None, :]  # [1, HEAD_DIM_A]; [BLOCK_N, HEAD_DIM_A] with the key tail
        if not EVEN_N:
            mask_va = mask_n[:, None] & mask_va
        v_a = tl.load(v_a_ptrs, mask=mask_va, other=0.0)  # [BLOCK_N, HEAD_DIM_A]
        p = p.to(v_a.dtype)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        v_a_ptrs += BLOCK_N * stride_vn
        if HEAD_DIM_B > 0:
            mask_vb = mask_b[None, :]
            if not EVEN_N:
                mask_vb = mask_n[:, None] & mask_vb
            v_b = tl.load(v_b_ptrs, mask=mask_vb, other=0.0)  # [BLOCK_N, HEAD_DIM_B]
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
            v_b_ptrs += BLOCK_N * stride_vn
        m_i = m_new

    if SPLIT_K:  # unnormalised o, m and l of this key chunk (an empty chunk: 0, -inf, 0)
        row = (pid_s * tl.num_programs(1) + pid_bh) * SEQ_Q + offs_m  # [BLOCK_M] rows of Partials
        p_rows = Partials + row.to(tl.int64) * (HEAD_DIM + 2)  # [BLOCK_M]
        tl.store(p_rows[:, None] + offs_a[None, :], acc_a, mask=mask_m[:, None] & mask_a[None, :])
        if HEAD_DIM_B > 0:
            tl.store(p_rows[:, None] + offs_b[None, :], acc_b, mask=mask_m[:, None] & mask_b[None, :])
        tl.store(p_rows + HEAD_DIM, m_i, mask=mask_m)
        tl.store(p_rows + HEAD_DIM + 1, l_i, mask=mask_m)
    else:
        l_rcp = 1.0 / l_i
        out_a = (acc_a * l_rcp[:, None]).to(Out.dtype.element_ty)
        tl.store(o_rows + offs_a[None, :] * stride_od, out_a, mask=mask_m[:, None] & mask_a[None, :])
        if HEAD_DIM_B > 0:
            out_b = (acc_b * l_rcp[:, None]).to(Out.dtype.element_ty)
            tl.store(o_rows + offs_b[None, :] * stride_od, out_b, mask=mask_m[:, None] & mask_b[None, :])


# The autotuner over _attention_kernel's tile configs: kernel_bench reads the config it chose and
# their timings from it; tests narrow its configs.
AUTOTUNER = _attention_kernel


@triton.jit
def _attention_combine_kernel(
    Partials,  # [NUM_SPLITS, B * H, SEQ_Q, HEAD_DIM + 2] fp32 from _attention_kernel: o, m, l
    Out,  # [B, H, SEQ_Q, HEAD_DIM] output, any strides
    stride_ob, stride_oh, stride_om, stride_od,  # Out strides in elements: batch, head, token, dim
    num_heads,  # H: splits program_id(1) into (batch, head)
    SEQ_Q,  # query tokens
    NUM_SPLITS,  # key-axis chunks to merge
    HEAD_DIM: tl.constexpr,  # D
    HEAD_DIM_P2: tl.constexpr,  # D padded to a power of two
    BLOCK_M: tl.constexpr,  # query rows per program
):
    """softmax over the whole key axis from the chunks' (o, m, l): rescale each to the common max."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, HEAD_DIM_P2)  # [HEAD_DIM_P2]
    mask_m = offs_m < SEQ_Q
    mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BLOCK_M, HEAD_DIM_P2]

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):  # chunk 0 is never empty, so m is finite from then on
        row = (s * tl.num_programs(1) + pid_bh) * SEQ_Q + offs_m
        p_rows = Partials + row.to(tl.int64) * (HEAD_DIM + 2)  # [BLOCK_M]
        m_s = tl.load(p_rows + HEAD_DIM, mask=mask_m, other=0.0)
        l_s = tl.load(p_rows + HEAD_DIM + 1, mask=mask_m, other=0.0)
        o_s = tl.load(p_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)
        beta = tl.exp2(m_s - m_new)  # 0 for an empty chunk (m_s = -inf)
        l = l * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m = m_new

    off_b = (pid_bh // num_heads).to(tl.int64)
    off_h = (pid_bh % num_heads).to(tl.int64)
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    l = tl.where(mask_m, l, 1.0)  # rows past SEQ_Q (never stored) would divide 0 by 0
    tl.store(o_ptrs, (acc / l[:, None]).to(Out.dtype.element_ty), mask=mask)


# (B, H, Sq, Sk, D, dtype, q/k/v/out strides, device) -> (chosen key splits, {name: ms}); filled
# once per shape by _tuned_splits. Read by benchmarks/kernel_bench.py.
TUNED_SPLITS: dict = {}
_SPLIT_CANDIDATES = (2, 4)  # key-axis splits timed against none where the grid leaves SMs idle


def launches(q, k, v, out, scale: float, splits: int) -> list[Launch]:
    """The calls of one attention forward into `out`, the key axis in `splits` chunks (each chunk's
    programs write partial results, then _attention_combine_kernel merges them), not run."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    # Batch, head and token strides all multiples of 8 (true for SD's packed projections) let the
    # kernel load rows as 16-byte vectors even when D = 40 gives them no larger power-of-two factor.
    align = 8 if all(s % 8 == 0 for t in (q, k, v, out) for s in t.stride()[:3]) else 1
    partials = out  # never touched unless split
    if splits > 1:
        partials = torch.empty((splits, B * H, Sq, D + 2), device=q.device, dtype=torch.float32)

    def grid(meta):
        return (triton.cdiv(Sq, meta["BLOCK_M"]), B * H, splits)

    args = (q, k, v, out, partials, *q.stride(), *k.stride(), *v.stride(), *out.stride(), H, Sq, Sk, splits, scale * _LOG2E)
    meta = dict(HEAD_DIM=D, DOT_PRECISION=_DOT_PRECISION[q.dtype], STRIDE_ALIGN=align)
    calls = [Launch(_attention_kernel, grid, args, meta)]
    if splits > 1:
        d_p2 = max(16, triton.next_power_of_2(D))
        block_m = max(16, 4096 // d_p2)  # 32 fp32 accumulator registers per thread at 4 warps
        args = (partials, out, *out.stride(), H, Sq, splits)
        meta = dict(HEAD_DIM=D, HEAD_DIM_P2=d_p2, BLOCK_M=block_m, num_warps=4)
        calls.append(Launch(_attention_combine_kernel, (triton.cdiv(Sq, block_m), B * H), args, meta))
    return calls


def launch(q, k, v, out, scale: float, splits: int) -> None:
    """One attention forward into `out` with the key axis in `splits` chunks."""
    for call in launches(q, k, v, out, scale, splits):
        call()


def _tuned_splits(q, k, v, out, scale: float) -> int:
    """How many chunks to split the key axis into for this shape: 1, unless the grid of 64-row
    query tiles would leave SMs idle and a split timed faster at the first call (on CUDA)."""
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    key = (B, H, Sq, Sk, D, q.dtype, q.stride(), k.stride(), v.stride(), out.stride(), q.device)
    if key in TUNED_SPLITS:
        return TUNED_SPLITS[key][0]
    if not tuning.can_time(q.device) or q.dtype == torch.float32:
        return 1
    plans = {"1": 1}
    if triton.cdiv(Sq, 64) * B * H < tuning.num_sms(q.device):
        plans.update({str(n): n for n in _SPLIT_CANDIDATES if n * 64 <= Sk})
    if len(plans) > 1:
        best, times = tuning.fastest(plans, lambda n: launch(q, k, v, out, scale, n))
    else:
        best, times = "1", {}
    TUNED_SPLITS[key] = (plans[best], times)
    return plans[best]


def attention(q, k, v, scale: float | None = None, *, out=None):
    """softmax(q k^T * scale) v for q [B, H, Sq, D], k/v [B, H, Sk, D]; any strides, no mask.

    scale defaults to 1/sqrt(D). fp16, bf16 and fp32 (fp32 matmuls without TF32).
    The result is a [B, H, Sq, D] view of a [B, Sq, H, D] buffer, so the usual
    `.transpose(1, 2).reshape(B, Sq, H * D)` that follows is free. `out` (optional, any strides)
    receives the result instead.
    Head dims above MAX_HEAD_DIM (the VAE's 512) fall back to F.scaled_dot_product_attention.
    On CUDA the first call for each shape tunes (tile configs, and a split of the key axis for
    short queries); make it before capturing a CUDA graph.
    """
    B, H, Sq, D = q.shape
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if not scale > 0:
        raise ValueError(f"attention: scale must be positive (the kernel's running max assumes it), got {scale}")
    if D > MAX_HEAD_DIM:
        ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
        return ref if out is None else out.copy_(ref)
    if out is None:
        out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, H, Sq, D]
    launch(q, k, v, out, scale, _tuned_splits(q, k, v, out, scale))
    return out
