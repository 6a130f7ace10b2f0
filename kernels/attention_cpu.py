"""bf16 attention on CPUs with AVX512-BF16: the launcher of `attention_cpu.c` (built by `cpu_library`).

torch's CPU flash attention is bound by its softmax at SD1.5's 4096-token self-attention; this
kernel runs both matmuls on AMX tiles (without AMX, as AVX512-BF16 dot products) and the softmax
as one AVX-512 pass with a polynomial 2^x (the C file says how). `benchmarks/attention_cpu.py`
times it against SDPA per SD1.5 shape.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from fastdiff import precision
from fastdiff.kernels import cpu_library

SOURCE = Path(__file__).with_name("attention_cpu.c")
# what the kernel's instructions need (Linux /proc/cpuinfo names), what its AMX matmuls need besides,
# and the compiler flags for both (the AMX code is compiled everywhere, run only where AMX_FLAGS are)
REQUIRED_CPU_FLAGS = ("avx512_bf16", "avx512f", "avx512bw", "avx512vl")
AMX_FLAGS = ("amx_tile", "amx_bf16")
COMPILE_FLAGS = ("-mamx-tile", "-mamx-bf16", "-mavx512bf16", "-mavx512f", "-mavx512bw", "-mavx512vl")
# Each thread holds the scores of 32 queries against every key in fp32 (and their bf16
# probabilities); up to this many keys that stays within an AMX host's core's L2 (2 MiB at the limit).
MAX_KEYS = 16384
# The widest head it takes: the VAE's single 512-wide head.
MAX_HEAD_DIM = 512
# On AMX it was as fast as SDPA or faster at every UNet shape (head dims up to SD1.5's 160), but at
# the VAE's 512-wide head SDPA led, so there that one stays with SDPA; the AVX512-BF16 matmuls led
# at every shape, the VAE's included (benchmarks/attention_cpu.py on each CPU; NOTES-cpu.md).
AMX_MAX_HEAD_DIM = 160
# At this many scores per head or fewer (SD1.5's lowest level: 64 x 64, 16 x 77 at 256 px) SDPA
# ran faster on AMX: the kernel's fixed cost per call (packing, threads) outweighs its faster
# softmax. Without AMX the kernel led there but at 16 x 16; the threshold is kept (little
# time a forward: NOTES-cpu.md's Zen5 section).
SDPA_MAX_SCORES = 4096


def declare(lib: ctypes.CDLL) -> None:
    """Argument types, and on an AMX CPU the tile state for this process (RuntimeError where Linux
    refuses it)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # (pointer, batch / head / token strides) for q, k, v, o; batch, heads, queries, keys, d; scale; threads; amx
    lib.attention_bf16.argtypes = [ptr, i64, i64, i64] * 4 + [i64] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.attention_bf16.restype = ctypes.c_int
    if cpu_has_amx():
        cpu_library.request_amx(lib.attention_init)


def cpu_can_run(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has the kernel's instructions (AVX512-BF16; AMX is optional)."""
    flags = precision.cpu_flags() if flags is None else flags
    return all(f in flags for f in REQUIRED_CPU_FLAGS)


def cpu_has_amx(flags: frozenset[str] | None = None) -> bool:
    """Whether the kernel's matmuls run on AMX tiles here (the other AMX kernels ask this too)."""
    flags = precision.cpu_flags() if flags is None else flags
    return cpu_can_run(flags) and all(f in flags for f in AMX_FLAGS)


def library() -> ctypes.CDLL | None:
    """The built library (with the AMX tile state granted to this process on an AMX CPU), or None:
    on CPUs without AVX512-BF16, and (logged once, with the reason) where it cannot be built or
    Linux refuses the tile state; `attention` is then not called and torch's SDPA runs."""
    if not cpu_can_run():
        return None
    return cpu_library.library(SOURCE, COMPILE_FLAGS, declare, "torch's SDPA")


def forget() -> None:
    """Forget the loaded library (tests build it again)."""
    cpu_library.forget(SOURCE)


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel takes these [B, heads, tokens, d] tensors: bf16 on the CPU, an even head
    dim up to MAX_HEAD_DIM, up to MAX_KEYS keys, each head's vectors contiguous (any other strides,
    e.g. the models' views of [B, tokens, heads * d])."""
    if not all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v)):
        return False
    B, H, N, D = q.shape
    M = k.shape[2]
    return (
        k.shape == v.shape == (B, H, M, D) and N > 0 and 0 < M <= MAX_KEYS and D % 2 == 0 and 0 < D <= MAX_HEAD_DIM and B * H > 0
    )


def pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel is worth calling: more than SDPA_MAX_SCORES scores per head, and on an
    AMX CPU a head dim up to AMX_MAX_HEAD_DIM."""
    return q.shape[2] * k.shape[2] > SDPA_MAX_SCORES and (q.shape[-1] <= AMX_MAX_HEAD_DIM or not cpu_has_amx())


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, amx: bool | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v for bf16 q [B, heads, N, d] and k, v [B, heads, M, d] (`supported`);
    `library()` must not be None. Returns [B, heads, N, d] laid out as [B, N, heads, d], so the
    models' reshape to [B, N, heads * d] is free. `amx`: the matmuls on AMX tiles (None: where the
    CPU has them); False runs the AVX512-BF16 ones on an AMX CPU too (tests check both there)."""
    has_amx = cpu_has_amx()
    if amx and not has_amx:
        raise ValueError("attention: amx=True on a CPU without AMX-BF16")
    amx = has_amx if amx is None else amx
    B, H, N, D = q.shape
    o = torch.empty(B, N, H, D, dtype=q.dtype).transpose(1, 2)  # [B, heads, N, d]
    args = []
    for t in (q, k, v, o):
        args += [t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)]
    scale = D**-0.5 if scale is None else scale
    with torch.profiler.record_function("fastdiff::attention_cpu"):  # profilers see ctypes calls only by name
        status = library().attention_bf16(*args, B, H, N, k.shape[2], D, scale, torch.get_num_threads(), int(amx))
    if status != 0:
        raise MemoryError(f"attention: no memory for the CPU kernel's packed keys and values ({B}x{H} heads, {k.shape[2]} keys)")
    return o
