"""GroupNorm (+ SiLU) of channels-last tensors on CPUs with AVX-512: the launcher of
`group_norm_cpu.c` (built by `cpu_library`).

oneDNN's packed convolutions return channels-last tensors, where torch runs GroupNorm and SiLU as
separate passes; the kernel does both in two passes over memory (the C file says how).
`benchmarks/group_norm_cpu.py` times it against torch per SD1.5 shape.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from fastdiff import precision
from fastdiff.kernels import cpu_library

SOURCE = Path(__file__).with_name("group_norm_cpu.c")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
# Below this many pixels an image torch's ran faster (SD1.5's 4x4 norms, benchmarks/group_norm_cpu.py
# --size 64 / 256: pass 1 splits an image by blocks of 64 pixels, and the call has a fixed cost).
# Per image, not per batch: a batch padded with more images must compute each image the same way.
MIN_PIXELS = 64
COMPILE_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512bf16")


def declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, y, is_bf16, weight, bias, images, pixels, channels, groups, eps, silu, threads
    lib.group_norm_nhwc.argtypes = [ptr, ptr, i32, ptr, ptr, i64, i64, i64, i64, ctypes.c_float, i32, i32]
    lib.group_norm_nhwc.restype = ctypes.c_int


def cpu_has_avx512(flags: frozenset[str] | None = None) -> bool:
    flags = precision.cpu_flags() if flags is None else flags
    return all(f in flags for f in REQUIRED_CPU_FLAGS)


def library() -> ctypes.CDLL | None:
    """The built library, or None: on CPUs without AVX-512 (and AVX512-BF16), and (logged once,
    with the reason) where it cannot be built; torch's GroupNorm and SiLU run then."""
    if not cpu_has_avx512():
        return None
    return cpu_library.library(SOURCE, COMPILE_FLAGS, declare, "torch's GroupNorm and SiLU")


def forget() -> None:
    """Forget the loaded library (tests build it again)."""
    cpu_library.forget(SOURCE)


def supported(x: torch.Tensor, num_groups: int) -> bool:
    """Whether the kernel takes `x`: fp32 or bf16 [B, C, H, W] on the CPU, dense channels-last,
    C a multiple of 16 and of `num_groups`."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 4:
        return False
    C = x.shape[1]
    return x.is_contiguous(memory_format=torch.channels_last) and C % 16 == 0 and C % num_groups == 0 and x.numel() > 0


def pays(x: torch.Tensor) -> bool:
    """Whether the kernel is worth calling: at least MIN_PIXELS pixels an image."""
    return x.shape[2] * x.shape[3] >= MIN_PIXELS


def as_fp32(p: torch.Tensor | None) -> torch.Tensor | None:
    """`p` as a contiguous float32 tensor: itself where it is one (`ops.fp32_copy` keeps such a
    copy of a bf16 model's parameters), else converted for this call."""
    return p if p is None or (p.dtype == torch.float32 and p.is_contiguous()) else p.detach().float().contiguous()


def group_norm(x: torch.Tensor, num_groups: int, weight, bias, eps: float, silu: bool = False) -> torch.Tensor:
    """F.group_norm (then SiLU) of a channels-last `x` (`supported`), channels-last out; the
    affine parameters are read in fp32 (`as_fp32`). `library()` must not be None."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)  # channels-last, as x
    w, b = as_fp32(weight), as_fp32(bias)
    with torch.profiler.record_function("fastdiff::group_norm_nhwc"):  # profilers see ctypes calls only by name
        status = library().group_norm_nhwc(
            x.data_ptr(), y.data_ptr(), int(x.dtype == torch.bfloat16), None if w is None else w.data_ptr(),
            None if b is None else b.data_ptr(), B, H * W, C, num_groups, eps, int(silu), torch.get_num_threads(),
        )
    if status != 0:
        raise MemoryError(f"group_norm: no memory for the kernel's per-channel sums ({C} channels)")
    return y
