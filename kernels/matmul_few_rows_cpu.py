"""bf16 convolutions with few output pixels on CPUs with AMX: the launcher of
`matmul_few_rows_cpu.c` (built by `cpu_library`).

At SD1.5's lowest UNet levels a convolution's output is 32 or 128 pixels (CFG batch 2 of 4x4 or
8x8 latents) and its time is reading 30-60 MB of weights, which oneDNN's kernels read at a
fraction of a sequential stream's rate. The kernel reads weights packed once (`pack`) in the
order its AMX tiles use them; the C file says how. `benchmarks/matmul_few_rows_cpu.py` times it
against oneDNN's packed kernels per SD1.5 shape, with weights cold as in a forward pass.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.kernels import attention_cpu, cpu_library

SOURCE = Path(__file__).with_name("matmul_few_rows_cpu.c")
COMPILE_FLAGS = attention_cpu.COMPILE_FLAGS
# Reduction steps (32 input values each) per chunk: the A tiles of a chunk at 128 rows (1 MiB) stay
# in L2 while the weights stream past. The packed weights' layout depends on it.
CHUNK = 128
# 3x3 convolutions with at most this many output pixels (over the batch) run the kernel: at SD1.5's
# 32 and 128 it ran faster than oneDNN's packed convolution, at 512 slower (the benchmark above).
# 1x1 convolutions and linears stay with oneDNN: their weights are small, and at these sizes the
# kernel's fixed cost per call made it slower there, or as fast.
MAX_CONV_ROWS = 128


def declare(lib: ctypes.CDLL) -> None:
    """Argument types, and the AMX tile state for this process (RuntimeError where Linux refuses it)."""
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    # x and its strides; B, H, W, C; kh, kw, stride, pad; packed weights, bias, N; residual and
    # its strides; y and its strides; OH, OW, chunk; threads
    lib.few_rows_conv_bf16.argtypes = (
        [ptr, i64, i64, i64] + [i64] * 4 + [i64] * 4 + [ptr, ptr, i64] + [ptr, i64, i64, i64] * 2 + [i64, i64, i64, ctypes.c_int]
    )
    lib.few_rows_conv_bf16.restype = ctypes.c_int
    cpu_library.request_amx(lib.few_rows_init)


def library() -> ctypes.CDLL | None:
    """The built library, or None: on CPUs without AMX-BF16, and (logged once, with the reason)
    where it cannot be built or Linux refuses the tile state; oneDNN's kernels then run."""
    if not attention_cpu.cpu_has_amx():
        return None
    return cpu_library.library(SOURCE, COMPILE_FLAGS, declare, "oneDNN's convolutions")


def forget() -> None:
    """Forget the loaded library (tests build it again)."""
    cpu_library.forget(SOURCE)


def output_size(x: torch.Tensor, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(OH, OW) of a square `kernel` with the same stride and padding along both axes."""
    return (x.shape[-2] + 2 * padding - kernel) // stride + 1, (x.shape[-1] + 2 * padding - kernel) // stride + 1


def supported_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """Whether the kernel takes this convolution: bf16 on the CPU, [B, C, H, W] input, a square
    kernel, the same stride and padding along both axes, a non-empty output."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 4 or weight.dim() != 4:
        return False
    (sh, sw), (ph, pw) = stride, padding
    if weight.shape[1] != x.shape[1] or weight.shape[2] != weight.shape[3] or sh != sw or ph != pw or sh < 1 or ph < 0:
        return False
    oh, ow = output_size(x, weight.shape[-1], sh, ph)
    return oh > 0 and ow > 0 and x.shape[0] > 0 and weight.shape[0] > 0


def pays_conv(x: torch.Tensor, weight: torch.Tensor, stride, padding) -> bool:
    """Whether the kernel is worth calling: a kernel wider than 1x1, at most MAX_CONV_ROWS output
    pixels over the batch."""
    oh, ow = output_size(x, weight.shape[-1], stride[0], padding[0])
    return weight.shape[-1] > 1 and x.shape[0] * oh * ow <= MAX_CONV_ROWS


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [N, C, kh, kw] bf16 weight in the kernel's order: k runs over (tap, input channel) with
    channels padded to 32, N is padded to 32; per chunk of CHUNK steps, per pair of 16-column
    blocks, per step, two B tiles [16 k pairs][16 columns][2]."""
    N, C = weight.shape[:2]
    w = weight
    c_pad, n_pad = -(-C // 32) * 32, -(-N // 32) * 32
    w = F.pad(w.permute(0, 2, 3, 1), (0, c_pad - C)).reshape(N, -1)  # [N, taps * c_pad]
    w = F.pad(w, (0, 0, 0, n_pad - N)).view(n_pad // 32, 2, 16, -1, 16, 2)  # [pair, block, column, step, k pair, 2]
    steps = w.shape[3]
    # per chunk: [pair, step, block, k pair, column, 2]
    chunks = [w[:, :, :, s : s + CHUNK].permute(0, 3, 1, 4, 2, 5).reshape(-1) for s in range(0, steps, CHUNK)]
    return torch.cat(chunks)


def run(x, sizes, strides, kernel, packed, bias, n, residual, out, out_strides, out_size) -> None:
    """Call the C kernel (see `few_rows_conv_bf16`): sizes (B, H, W, C), strides and out_strides
    (image, row, pixel) in elements, kernel (k, stride, padding), residual (tensor, strides) or
    None, out_size (OH, OW)."""
    res, res_strides = residual if residual is not None else (None, (0, 0, 0))
    k, stride, padding = kernel
    with torch.profiler.record_function("fastdiff::matmul_few_rows"):  # profilers see ctypes calls only by name
        status = library().few_rows_conv_bf16(
            x.data_ptr(), *strides, *sizes, k, k, stride, padding, packed.data_ptr(),
            None if bias is None else bias.data_ptr(), n, None if res is None else res.data_ptr(), *res_strides,
            out.data_ptr(), *out_strides, *out_size, CHUNK, torch.get_num_threads(),
        )  # fmt: skip
    if status != 0:
        raise MemoryError(f"matmul_few_rows: no memory for the kernel's buffers ({sizes}, {n} outputs)")


def pixel_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(image, row, pixel) strides of a [B, C, H, W] tensor."""
    return t.stride(0), t.stride(2), t.stride(3)


def conv2d(x, packed, bias, n: int, kernel: int, stride: int, padding: int, residual=None) -> torch.Tensor:
    """conv2d(x, weight, bias, stride, padding) (+ residual) for bf16 x [B, C, H, W] (`supported_conv`;
    any layout, read channels-last) and `pack(weight)`; bias fp32 [n] or None, residual bf16 of the
    output's shape or None. Returns a channels-last [B, n, OH, OW] tensor; `library()` must not be None."""
    B, C, H, W = x.shape
    x = x.contiguous(memory_format=torch.channels_last)  # [B, H, W, C] in memory
    oh, ow = output_size(x, kernel, stride, padding)
    y = torch.empty(B, n, oh, ow, dtype=torch.bfloat16, memory_format=torch.channels_last)
    res = None
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
        res = (residual, pixel_strides(residual))
    run(x, (B, H, W, C), pixel_strides(x), (kernel, stride, padding), packed, bias, n, res, y, pixel_strides(y), (oh, ow))
    return y

