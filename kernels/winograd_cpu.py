"""bf16 3x3 convolutions as Winograd F(2x2, 3x3) on CPUs with AVX512-BF16 and without AMX: the
launcher of `winograd_cpu.c` (built by `cpu_library`), whose header says how.

Without AMX a bf16 convolution runs at the CPU's dot-product rate, so it is faster only with
fewer products: 16 matmuls of [tiles, C] x [C, Co] on oneDNN-packed transformed weights do the
work of 36 per 2 x 2 output pixels. The price is precision: the transformed input and the
matmuls' products are rounded to bf16, which adds error (`benchmarks/winograd_cpu.py` measures
it and the speed per SD1.5 shape).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from fastdiff import precision
from fastdiff.kernels import attention_cpu, cpu_library

SOURCE = Path(__file__).with_name("winograd_cpu.c")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_bf16")
COMPILE_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512bf16")
# Fewer output pixels an image than this and the transformed weights (16 / 9 of the direct ones)
# are read for too few tiles: at SD1.5's 4 x 4 level (256 px) the direct convolution led
# (benchmarks/winograd_cpu.py).
MIN_PIXELS = 64
# And a call has a fixed cost (16 oneDNN calls, two passes) that small convolutions do not repay,
# nor do the 16 small matmuls split well between threads: at 2 threads it led from SD1.5's
# smallest UNet 3x3 convolution (943M multiply-adds at 256 px) up, gained at most 1.2x at
# 300-600M and lost below, at the embedded model's too (NOTES-cpu.md's Zen4 section).
MIN_MULTIPLY_ADDS = 800_000_000
# The transformed input and the products of a chunk of tiles are each at most this large, so a
# large image's convolution needs no more memory than this twice (unchunked, 16 / 4 times its
# input and output); smaller chunks, meant to stay in cache, ran no faster (NOTES-cpu.md).
CHUNK_BYTES = 64 << 20
# B^T d B, G g G^T and A^T M A of F(2x2, 3x3) (the C file applies B and A; the weights are made here)
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    # x, v, images, height, width, channels, first tile, tiles, threads
    lib.winograd_input.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i32]
    lib.winograd_input.restype = ctypes.c_int
    # m (16 pointers), bias, residual, y, images, height, width, channels, first tile, tiles, threads
    lib.winograd_output.argtypes = [ctypes.POINTER(ptr), ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i32]
    lib.winograd_output.restype = ctypes.c_int


def cpu_can_run(flags: frozenset[str] | None = None) -> bool:
    """Whether this is a CPU the kernel is meant for: AVX512-BF16 and no AMX (measured on CPUs
    without AMX only; with AMX oneDNN's convolutions run at another rate and this was not timed
    there, benchmarks/NOTES-cpu.md, so AMX CPUs keep oneDNN's direct convolutions)."""
    flags = precision.cpu_flags() if flags is None else flags
    return all(f in flags for f in REQUIRED_CPU_FLAGS) and not attention_cpu.cpu_has_amx(flags)


def library() -> ctypes.CDLL | None:
    """The built library, or None: on other CPUs (`cpu_can_run`), and (logged once, with the
    reason) where it cannot be built; oneDNN's direct convolution runs then."""
    if not cpu_can_run():
        return None
    return cpu_library.library(SOURCE, COMPILE_FLAGS, declare, "oneDNN's direct convolution")


def forget() -> None:
    """Forget the loaded library (tests build it again)."""
    cpu_library.forget(SOURCE)


def supported(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """Whether the kernel takes this convolution: bf16 [B, C, H, W] channels-last on the CPU, a
    3x3 bf16 weight, stride 1, padding 1, C and the output channels multiples of 16."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 4:
        return False
    if tuple(weight.shape[2:]) != (3, 3) or tuple(stride) != (1, 1) or tuple(padding) != (1, 1):
        return False
    if x.shape[1] % 16 or weight.shape[0] % 16 or weight.shape[1] != x.shape[1] or x.numel() == 0:
        return False
    return x.is_contiguous(memory_format=torch.channels_last)


def pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether it is worth running: at least MIN_PIXELS output pixels an image and
    MIN_MULTIPLY_ADDS in the direct convolution."""
    pixels = x.shape[2] * x.shape[3]
    return pixels >= MIN_PIXELS and x.shape[0] * pixels * weight.shape[0] * weight.shape[1] * 9 >= MIN_MULTIPLY_ADDS


def tiles(x: torch.Tensor) -> int:
    """How many 2 x 2 output tiles `x`'s convolution has."""
    return x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)


def chunk_tiles(x: torch.Tensor, out_channels: int) -> int:
    """How many tiles a call transforms and multiplies at a time (its matmuls' rows): as many as
    keep the transformed input and the products within CHUNK_BYTES each."""
    per_tile = 16 * 2 * max(x.shape[1], out_channels)  # bytes of one tile's V or M rows
    return max(1, min(tiles(x), CHUNK_BYTES // per_tile))


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """G g G^T of a [Co, C, 3, 3] weight, summed in float64 and rounded once to its dtype:
    [16, Co, C], position a * 4 + b of the 4 x 4 transformed tile first. A few output channels
    at a time, so that the float64 copies stay in cache (2.5-3.5x faster at SD1.5's largest
    weights than all at once)."""
    g = torch.tensor(G, dtype=torch.float64)
    co, c = weight.shape[:2]
    u = torch.empty(16, co, c, dtype=weight.dtype)
    block = max(1, (2 << 20) // (c * 9 * 8))  # output channels a block: 2 MiB of float64 weights
    for o in range(0, co, block):
        w = weight[o : o + block].detach().double()
        u[:, o : o + block] = torch.einsum("ak,oikl,bl->aboi", g, w, g).reshape(16, -1, c)  # [4 * 4, block, C]
    return u


def conv2d(x: torch.Tensor, packed: tuple, bias, out_channels: int, residual=None) -> torch.Tensor:
    """The convolution of a `supported` `x` (channels-last out) with `packed`, the 16 transformed
    weights each packed by oneDNN for a [tiles, C] input; `bias` fp32 or None; `residual`, when
    given, a channels-last bf16 tensor of the output's shape added before rounding. `library()`
    must not be None."""
    B, C, H, W = x.shape
    lib, threads = library(), torch.get_num_threads()
    total, chunk = tiles(x), chunk_tiles(x, out_channels)
    v = torch.empty(16, chunk, C, dtype=torch.bfloat16)  # [16, chunk tiles, C]
    y = torch.empty(B, out_channels, H, W, dtype=torch.bfloat16, memory_format=torch.channels_last)
    b, res = None if bias is None else bias.data_ptr(), None if residual is None else residual.data_ptr()
    for first in range(0, total, chunk):
        count = min(chunk, total - first)
        vc = v.view(-1)[: 16 * count * C].view(16, count, C)  # the last chunk's may be fewer rows
        with torch.profiler.record_function("fastdiff::winograd_cpu"):  # profilers see ctypes calls only by name
            lib.winograd_input(x.data_ptr(), vc.data_ptr(), B, H, W, C, first, count, threads)
        m = [torch.ops.mkldnn._linear_pointwise(vc[k], packed[k], None, "none", [], "") for k in range(16)]  # 16 x [count, Co]
        pointers = (ctypes.c_void_p * 16)(*(t.data_ptr() for t in m))
        with torch.profiler.record_function("fastdiff::winograd_cpu"):
            lib.winograd_output(pointers, b, res, y.data_ptr(), B, H, W, out_channels, first, count, threads)
    return y
