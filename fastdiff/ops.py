"""The one dispatch seam between the model code and the compute kernels.

Every normalisation, attention, activation and convolution call in `fastdiff.models` goes
through this file.
Each op has a plain torch reference definition (used on CPU, for ONNX export, and as the
readable spec) and, where one exists, a fused Triton kernel from `fastdiff.kernels` (used on
CUDA by default).

Which path runs is chosen by the kernel mode:
  - "auto"   (default): Triton on CUDA tensors, torch reference everywhere else; except that
              attention runs torch's SDPA instead at shapes where SDPA timed faster at the
              shape's first call (`ATTENTION_CHOICE`), so the pipeline is never slower for
              using the kernel where cuDNN's is ahead. GroupNorm and GEGLU measured
              faster than torch's at every SD shape (benchmarks/NOTES-gpu.md, from
              benchmarks/kernel_bench.py), so they are not timed against it;
  - "torch":  always the torch reference;
  - "triton": always Triton (on CPU tensors this needs TRITON_INTERPRET=1, which is how CI tests
              the kernels).
In "auto" mode 1x1 and small fp32 convolutions on the CPU also take ATen's im2col + GEMM path
over oneDNN's (`SMALL_CONV_PIXELS`), an upsampler's nearest 2x + 3x3 convolution runs as one
transposed convolution (`PACKED_CONV_TRANSPOSE`; "torch" and "triton" keep `F.conv2d`), bf16
attention on an AVX512-BF16 CPU runs a C kernel (`attention_path`; its matmuls on AMX where there
is AMX), and so do bf16 3x3 convolutions with few output pixels on an AMX CPU (`few_rows`) and
GroupNorm(+SiLU) of channels-last tensors on an AVX-512 CPU (`group_norm_path`); linears run
oneDNN on packed weights in bf16, and in fp32 at the shapes where that timed faster than F.linear
(`packed_linear`).
The mode comes from the environment variable FASTDIFF_KERNELS, and can be changed with
`set_kernels()` or the `kernels()` context manager (Pipeline(kernels=...) uses the latter).
ONNX export always traces the torch reference.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import weakref

import torch
import torch.nn.functional as F

from fastdiff import precision

_MODES = ("auto", "torch", "triton")
_state = threading.local()


def _default_mode() -> str:
    mode = os.environ.get("FASTDIFF_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"FASTDIFF_KERNELS={mode!r}: allowed values are {', '.join(_MODES)}")
    return mode


_global_mode = _default_mode()


def get_kernels() -> str:
    """The kernel mode in force for this thread."""
    return getattr(_state, "mode", None) or _global_mode


def set_kernels(mode: str) -> None:
    """Set the process-wide kernel mode ("auto", "torch" or "triton")."""
    global _global_mode
    if mode not in _MODES:
        raise ValueError(f"kernels={mode!r}: allowed values are {', '.join(_MODES)}")
    _global_mode = mode


@contextlib.contextmanager
def kernels(mode: str | None):
    """Use `mode` for ops called in this thread inside the block (None: leave as is)."""
    if mode is None:
        yield
        return
    if mode not in _MODES:
        raise ValueError(f"kernels={mode!r}: allowed values are {', '.join(_MODES)}")
    prev = getattr(_state, "mode", None)
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = prev


def tracing() -> bool:
    """Inside a trace, an ONNX export or a torch.compile: the torch reference ops only. Both ONNX
    exporters raise one of these two flags (the TorchScript one traces, the dynamo one runs
    torch.export), and `torch.onnx.is_in_onnx_export()` costs two imports a call, paid by every
    op in "auto" mode (tests/test_models.py checks each tracer)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _use_triton(x: torch.Tensor) -> bool:
    if tracing():
        return False
    mode = get_kernels()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return x.is_cuda


# ----------------------------------------------------------------------------------------------
# torch reference definitions: the spec each kernel is tested against.


def group_norm_ref(x, num_groups: int, weight, bias, eps: float, silu: bool = False):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def layer_norm_ref(x, weight, bias, eps: float):
    return F.layer_norm(x, weight.shape, weight, bias, eps)  # weight.shape: a constant for the tracer


def conv2d_ref(x, weight, bias, stride: tuple[int, int], padding: tuple[int, int]):
    return F.conv2d(x, weight, bias, stride, padding)


def attention_ref(q, k, v, scale: float | None = None, causal: bool = False):
    # q: [B, heads, Sq, D], k/v: [B, heads, Sk, D] -> [B, heads, Sq, D]
    return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal)


def geglu_ref(h):
    # h: [..., 2 * inner] -> [..., inner]; first half is the value, second half the gate.
    x, gate = h.chunk(2, dim=-1)
    return x * F.gelu(gate)


# ----------------------------------------------------------------------------------------------
# public ops: what the models call.


def cpu_kernel_may_run(*tensors) -> bool:
    """Whether a C kernel of `fastdiff.kernels` may take these CPU tensors (None is skipped): "auto"
    mode, outside tracing and export, and no gradient wanted (the kernels have no backward)."""
    if tensors[0].device.type != "cpu" or get_kernels() != "auto" or tracing():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def group_norm_path(x, num_groups: int, weight=None) -> str:
    """Which way `group_norm` runs: "triton", "cpu" (a channels-last fp32/bf16 CPU tensor with
    AVX-512 in "auto" mode, of the sizes where it ran faster: `fastdiff.kernels.group_norm_cpu`;
    packed convolutions leave their outputs channels-last) or "torch"."""
    if _use_triton(x):
        return "triton"
    if not cpu_kernel_may_run(x, weight):
        return "torch"
    try:
        from fastdiff.kernels import group_norm_cpu
    except ImportError:  # the kernels package needs triton (Linux x86_64)
        return "torch"
    usable = group_norm_cpu.supported(x, num_groups) and group_norm_cpu.pays(x)
    return "cpu" if usable and group_norm_cpu.library() is not None else "torch"


def group_norm(x, num_groups: int, weight, bias, eps: float, silu: bool = False):
    """GroupNorm over [B, C, H, W] (any memory format), optionally followed by SiLU."""
    path = group_norm_path(x, num_groups, weight)
    if path == "triton":
        from fastdiff.kernels.group_norm import group_norm as kernel

        return kernel(x, num_groups, weight, bias, eps, silu=silu)
    if path == "cpu":
        from fastdiff.kernels.group_norm_cpu import group_norm as kernel

        return kernel(x, num_groups, fp32_copy(weight), fp32_copy(bias), eps, silu=silu)
    return group_norm_ref(x, num_groups, weight, bias, eps, silu)


# On the CPU (fp32, "auto" mode) 1x1 convolutions, and others with at most this many output pixels
# per image, run as im2col + one GEMM (ATen's thnn_conv2d) rather than through oneDNN. On the
# 2-core x86 dev CPU at SD1.5's shapes (`benchmarks/conv_cpu.py`, side by side) oneDNN took
# 2-3.4x as long for 3x3 at 8x8 and 4x4 outputs (1280 -> 1280 at 4x4: 22.8 vs 7.1 ms) and
# 1.1-2.2x for every 1x1; 3x3 tied at 16x16 and oneDNN led from 32x32 (up to 2x at the VAE's
# 512x512), where this rule leaves it. thnn_conv2d splits a batch over threads, one image each
# (a single image gets a threaded GEMM), so the rule also needs a batch of 1 or a multiple of the
# thread count: the cases measured; a batch of 2 on 16 threads would leave 14 idle.
SMALL_CONV_PIXELS = 64


def im2col_conv(x, weight, stride, padding, packable: bool | None = None) -> bool:
    """Whether `conv2d` takes the im2col + GEMM path: fp32 on the CPU in "auto" mode, outside
    tracing, export and autocast, a batch that fills the threads, a 1x1 kernel, or a small output
    where packed oneDNN cannot run (`packable`: `packed_conv(x, weight)` when the caller has it)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or get_kernels() != "auto" or tracing():
        return False
    if torch.is_autocast_enabled("cpu") or (x.shape[0] > 1 and x.shape[0] % torch.get_num_threads()):
        return False
    (kh, kw), (sh, sw), (ph, pw) = weight.shape[2:], stride, padding
    if kh == kw == 1:
        return True
    if packed_conv(x, weight) if packable is None else packable:  # it beat im2col at every small 3x3 measured
        return False
    out_h = (x.shape[-2] + 2 * ph - kh) // sh + 1
    out_w = (x.shape[-1] + 2 * pw - kw) // sw + 1
    return out_h * out_w <= SMALL_CONV_PIXELS


# The other CPU convolutions run oneDNN on a copy of the weight packed once into oneDNN's blocked
# layout (what F.conv2d redoes at every call on a plain weight): `benchmarks/conv_cpu.py` times the
# three ways per SD1.5 shape. Packed copies live as long as their weight and are packed again when
# it changes in place (its version counter moves); they cost one more copy of the conv weights
# (benchmarks/NOTES-cpu.md says how much for SD1.5); FASTDIFF_KERNELS=torch turns this off.
PACKED_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()
# ((id of each weight), what) -> (weakrefs to the weights, their versions, packed copy); `what`
# names the copy (a convolution's stride and padding, a linear's half of the rows)
_packed: dict[tuple, tuple] = {}


def can_pack(x, weight) -> bool:
    """Whether a packed oneDNN copy of `weight` may serve `x`: the CPU in "auto" mode, fp32 (or
    bf16 on a CPU with bf16 instructions) input and weight alike, outside tracing, export,
    autocast and autograd, a weight that can change in place only visibly (not an inference-mode
    tensor, whose version is not tracked)."""
    if x.device.type != "cpu" or get_kernels() != "auto" or tracing():
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype or weight.is_inference():
        return False
    if x.dtype == torch.bfloat16 and not precision.cpu_runs_fast(torch.bfloat16):
        return False  # oneDNN packs bf16 only with AVX-512 (or AVX-NE-CONVERT): the rule's bf16 CPUs
    return not torch.is_autocast_enabled("cpu") and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


def tensor_version(t: torch.Tensor) -> int | None:
    """`t`'s version counter, which moves at each in-place change; None for an inference tensor
    (made under torch.inference_mode), which has none."""
    return None if t.is_inference() else t._version


def packed_copy(weight, what: tuple, pack):
    """`pack()`'s copy of `weight` (a tensor, or a tuple of tensors packed together) for `what`,
    made on first use and again after an in-place change of a weight; dropped with the weights."""
    weights = weight if isinstance(weight, tuple) else (weight,)
    versions = tuple(map(tensor_version, weights))
    if None in versions:
        return pack()  # no version to see an in-place change by: made afresh at every call
    key = (tuple(map(id, weights)), what)
    hit = _packed.get(key)
    alive = hit is not None and all(ref() is w for ref, w in zip(hit[0], weights))
    if alive and hit[1] == versions:
        return hit[2]
    packed = pack()
    if not alive:
        for w in weights:
            weakref.finalize(w, _packed.pop, key, None)
    _packed[key] = (tuple(map(weakref.ref, weights)), versions, packed)
    return packed


def fp32_copy(t):
    """A contiguous float32 copy of a parameter the CPU kernels read in float32 (biases, norm
    affines), kept as `packed_copy` keeps packed weights: a bf16 model's were converted at every
    call, several aten ops each, and every small op is dearest right after a large one
    (`benchmarks/NOTES-cpu.md`). None stays None; a contiguous float32 tensor is returned as is."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return packed_copy(t, ("fp32",), lambda: t.detach().float().contiguous())


def packed_conv(x, weight) -> bool:
    """Whether `conv2d` runs oneDNN on a packed weight (see `can_pack`)."""
    return PACKED_CONV and can_pack(x, weight)


def packed_weight(weight, stride, padding, input_shape) -> torch.Tensor:
    """The oneDNN-packed copy of a convolution `weight` for these settings (the layout is chosen
    for the first input's shape; others stay correct)."""
    pack = torch.ops.mkldnn._reorder_convolution_weight
    return packed_copy(weight, ("conv", stride, padding), lambda: pack(weight, list(padding), list(stride), [1, 1], 1, list(input_shape)))


def few_rows(x, weight, stride, padding) -> bool:
    """Whether a bf16 convolution whose weight may be packed (`conv_path` checks `packed_conv`
    first) runs the AMX kernel for few output pixels (`fastdiff.kernels.matmul_few_rows_cpu`): an
    AMX CPU, a 3x3 kernel and at most its MAX_CONV_ROWS output pixels, where it read the weights
    faster than oneDNN (`benchmarks/matmul_few_rows_cpu.py`)."""
    if x.dtype != torch.bfloat16:
        return False
    try:
        from fastdiff.kernels import matmul_few_rows_cpu as kernel
    except ImportError:  # the kernels package needs triton (Linux x86_64): no AMX elsewhere
        return False
    usable = kernel.supported_conv(x, weight, stride, padding) and kernel.pays_conv(x, weight, stride, padding)
    return usable and kernel.library() is not None


def few_rows_weight(weight) -> torch.Tensor:
    """The few-rows kernel's packed copy of a convolution's `weight`."""
    from fastdiff.kernels.matmul_few_rows_cpu import pack

    return packed_copy(weight, ("few_rows",), lambda: pack(weight))


def winograd(x, weight, stride, padding) -> bool:
    """Whether a bf16 convolution whose weight may be packed (`conv_path` checks `packed_conv`
    first) runs as Winograd F(2x2, 3x3) (`fastdiff.kernels.winograd_cpu`): a CPU with AVX512-BF16
    and no AMX, a 3x3 kernel, stride 1, padding 1, and enough output pixels and work
    (`benchmarks/winograd_cpu.py`)."""
    if x.dtype != torch.bfloat16:
        return False
    try:
        from fastdiff.kernels import winograd_cpu as kernel
    except ImportError:  # the kernels package needs triton (Linux x86_64)
        return False
    usable = kernel.supported(x, weight, stride, padding) and kernel.pays(x, weight)
    return usable and kernel.library() is not None


def winograd_weights(weight, x) -> tuple:
    """The Winograd kernel's 16 transformed copies of a convolution's `weight`, each packed by
    oneDNN for the first input's chunk of tiles (others stay correct)."""
    from fastdiff.kernels.winograd_cpu import chunk_tiles, transform_weight

    def pack():
        u = transform_weight(weight)  # [16, Co, C]
        return tuple(torch.ops.mkldnn._reorder_linear_weight(u[k], chunk_tiles(x, weight.shape[0])) for k in range(16))

    return packed_copy(weight, ("winograd",), pack)


def conv_path(x, weight, stride, padding) -> str:
    """Which way `conv2d` runs: "im2col", "few_rows" (see `few_rows`), "winograd" (see
    `winograd`), "packed" (oneDNN on a packed weight) or "reference"."""
    packable = packed_conv(x, weight)
    if im2col_conv(x, weight, stride, padding, packable):
        return "im2col"
    if packable and few_rows(x, weight, stride, padding):
        return "few_rows"
    if packable and winograd(x, weight, stride, padding):
        return "winograd"
    return "packed" if packable else "reference"


def conv2d(x, weight, bias, stride: tuple[int, int], padding: tuple[int, int], residual=None):
    """2-D convolution (dilation 1, one group), plus `residual` (a tensor of the output's shape)
    when given; on the CPU see SMALL_CONV_PIXELS and PACKED_CONV. On the packed path the residual
    is a post-op of oneDNN's convolution, so the output is written once and rounded once
    (`benchmarks/profile_step.py --network vae` shows the adds this saves)."""
    path = conv_path(x, weight, stride, padding)
    if path == "few_rows":
        from fastdiff.kernels import matmul_few_rows_cpu as kernel

        n, k = weight.shape[0], weight.shape[-1]
        out = (x.shape[0], n, *kernel.output_size(x, k, stride[0], padding[0]))
        fused = residual is not None and residual.dtype == x.dtype and tuple(residual.shape) == out
        y = kernel.conv2d(x, few_rows_weight(weight), fp32_copy(bias), n, k, stride[0], padding[0], residual if fused else None)
        return y if residual is None or fused else y + residual
    if path == "winograd":
        from fastdiff.kernels import winograd_cpu as kernel

        fused = residual is not None and residual.dtype == x.dtype and residual.shape == x.shape[:1] + (weight.shape[0],) + x.shape[2:]
        fused = fused and residual.is_contiguous(memory_format=torch.channels_last)
        y = kernel.conv2d(x, winograd_weights(weight, x), fp32_copy(bias), weight.shape[0], residual if fused else None)
        return y if residual is None or fused else y + residual
    if path == "im2col":
        y = torch.ops.aten.thnn_conv2d(x, weight, weight.shape[2:], bias, stride, padding)
    elif path == "packed":
        packed = packed_weight(weight, tuple(stride), tuple(padding), x.shape)
        args = (list(padding), list(stride), [1, 1], 1)
        if residual is not None and residual.dtype == x.dtype and same_layout(x, residual):
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, bias, *args, "add", 1.0, None, [], None)
        y = torch.ops.mkldnn._convolution_pointwise(x, packed, bias, *args, "none", [], "")
    else:
        y = conv2d_ref(x, weight, bias, stride, padding)
    return y if residual is None else y + residual


# Nearest 2x upsampling then a 3x3 convolution (padding 1) is one transposed convolution with
# stride 2 and a 4x4 kernel whose taps are sums of the 3x3 ones: along each axis an even output
# pixel sees input pixels (i-1, i) with taps (w0, w1+w2), an odd one (i, i+1) with (w0+w1, w2).
# That is 4 of the 9 multiply-adds per output pixel, and the upsampled input is never written. On
# the CPU's packed path oneDNN runs it on a packed copy of that kernel, summed in float64 and
# rounded once to the weight's dtype (`benchmarks/upsample_conv_cpu.py` times both ways per SD1.5
# upsampler). Elsewhere (CUDA, export, "torch" mode) the two ops run as written.
PACKED_CONV_TRANSPOSE = PACKED_CONV and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise")
# taps of the 4x4 kernel along one axis (rows) as sums of the 3x3 kernel's (columns)
UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def upsample_doubles(x, size=None) -> bool:
    """Whether upsampling `x` to `size` (None: twice its sides) doubles both of its sides."""
    return size is None or (size[0] == 2 * x.shape[-2] and size[1] == 2 * x.shape[-1])


def upsample_conv_ref(x, weight, bias, size: tuple[int, int] | None = None):
    """The module as written: nearest upsampling, then `conv2d` (on whichever of its paths)."""
    if upsample_doubles(x, size):  # a scale factor, not a size, so that export keeps sizes dynamic
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    else:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
    return conv2d(x, weight, bias, (1, 1), (1, 1))


def transposed_upsample_weight(weight) -> torch.Tensor:
    """The [in, out, 4, 4] transposed-convolution kernel equal to nearest 2x upsampling then a
    3x3 `weight` ([out, in, 3, 3]) with padding 1."""
    taps = torch.tensor(UPSAMPLE_TAPS, dtype=torch.float64, device=weight.device)  # [4, 3]
    return torch.einsum("kp,oipq,lq->iokl", taps, weight.double(), taps).to(weight.dtype).contiguous()


def upsample_conv_path(x, weight, size=None) -> str:
    """Which way `upsample_conv` runs: "transposed" (oneDNN on the packed 4x4 kernel) or "reference"
    (as written; on the CPU also where the 3x3 convolution at the doubled size takes the few-rows
    kernel: bound by reading its weights, it reads 9 taps where the 4x4 kernel reads 16)."""
    if PACKED_CONV_TRANSPOSE and upsample_doubles(x, size) and weight.shape[2:] == (3, 3) and can_pack(x, weight):
        B, C, H, W = x.shape
        doubled = x[:, :, :1, :1].expand(B, C, 2 * H, 2 * W)  # the upsampled input's shape, nothing allocated
        return "reference" if few_rows(doubled, weight, (1, 1), (1, 1)) else "transposed"
    return "reference"


def upsample_conv(x, weight, bias, size: tuple[int, int] | None = None):
    """Nearest upsampling of [B, C, H, W] to `size` (default twice H and W), then a 3x3
    convolution with padding 1: see PACKED_CONV_TRANSPOSE."""
    if upsample_conv_path(x, weight, size) == "reference":
        return upsample_conv_ref(x, weight, bias, size)
    return upsample_conv_transposed(x, weight, bias)


def upsample_conv_transposed(x, weight, bias):
    """`upsample_conv` to twice the sides on its "transposed" path (oneDNN on a packed copy of
    the 4x4 kernel); `can_pack(x, weight)` must hold."""
    reorder = torch.ops.mkldnn._reorder_convolution_transpose_weight
    shape = list(x.shape)
    packed = packed_copy(weight, ("upsample",), lambda: reorder(transposed_upsample_weight(weight), [1, 1], [0, 0], [2, 2], [1, 1], 1, shape))
    # padding, output padding, stride, dilation, groups, post-op
    return torch.ops.mkldnn._convolution_transpose_pointwise(x, packed, bias, [1, 1], [0, 0], [2, 2], [1, 1], 1, "none", [], "")


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both dense in NCHW order, or both in NHWC (channels-last) order."""
    return (a.is_contiguous() and b.is_contiguous()) or (
        a.is_contiguous(memory_format=torch.channels_last) and b.is_contiguous(memory_format=torch.channels_last)
    )


# bf16 linears on the CPU run oneDNN on a packed copy of the weight too: F.linear reorders a
# plain bf16 weight at every call, and at SD1.5's sizes a UNet forward is bound by streaming its
# weights from memory (`benchmarks/profile_step.py --device cpu --size 64` against 256 shows the
# fixed part). Packed, a residual add or GEGLU's gelu and product become post-ops of the matmul.
# The copies cost one more copy of the linear weights (benchmarks/NOTES-cpu.md). fp32 linears
# take the packed path only at the shapes where it timed faster than F.linear (`FP32_PACKED`).
PACKED_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()


def packed_linear(x, weight, width: int | None = None) -> bool:
    """Whether `linear`, `linear_split` and `linear_geglu` run oneDNN on a packed copy of `weight`
    (see `can_pack`): bf16 always, fp32 where `fp32_packing_pays` for the matmul [tokens, K] x
    [K, width] (width: the weight's rows, or the summed rows of weights run as one)."""
    if not (PACKED_LINEAR and can_pack(x, weight)):
        return False
    tokens = x.numel() // max(x.shape[-1], 1)
    return x.dtype == torch.bfloat16 or (tokens > 0 and fp32_packing_pays(tokens, x.shape[-1], width or weight.shape[0]))


def time_calls(calls: dict, rounds: int, repeat: int = 1, min_seconds: float = 0.0, settled=None, warm: bool = True) -> dict:
    """{name: [seconds a call, per round]} for each zero-argument call in `calls`: one untimed call
    each where `warm` (oneDNN builds each primitive on its first call), then `rounds` rounds of
    `repeat` calls of each, the ways interleaved so that the host's slow phases hit them alike;
    more calls a round where the first way's untimed call took under `min_seconds` / `repeat`
    (short calls are noisy); fewer rounds where `settled(seconds so far)` says the answer is
    already clear."""
    for i, call in enumerate(calls.values() if warm else ()):
        start = time.perf_counter()
        call()
        if i == 0 and min_seconds > 0:
            repeat = max(repeat, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    seconds: dict = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(repeat):
                call()
            seconds[name].append((time.perf_counter() - start) / repeat)
        if settled is not None and settled(seconds):
            break
    return seconds


def upper_median(values) -> float:
    """The median of `values`, the upper one of an even count (an element, never an average)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def median_ratio(slower: list, faster: list) -> float:
    """The median of the rounds' ratios slower / faster (`upper_median`): one slow round does not
    decide."""
    return upper_median(a / b for a, b in zip(slower, faster))


# (tokens, K, N, threads) of an fp32 linear -> (whether it runs packed, {way: median seconds a
# call}). oneDNN's fixed cost per call loses to F.linear (MKL) at small matmuls, as the embedded
# model's, and its packed weight wins at SD1.5's (`benchmarks/linear_layout_cpu.py --dtype fp32`
# times both per shape), with no size that divides them on every CPU. So each shape is timed once,
# at its first call, on constant data. Read by benchmarks and tests.
FP32_PACKED: dict = {}
# The packed way must be this much faster: its copy costs memory, so a near tie keeps F.linear.
FP32_PACKED_MARGIN = 1.05
# Two rounds whose ratios are both this far past the margin, the same way, end the timing early:
# most of SD1.5's shapes are 1.4-3x apart, and the first call pays for every round at every shape.
FP32_PACKED_CLEAR = 1.3


def fp32_packing_pays(tokens: int, k: int, n: int) -> bool:
    """Whether oneDNN on a packed weight ran an fp32 [tokens, K] x [K, N] matmul (with bias)
    FP32_PACKED_MARGIN faster than F.linear: the median of 3 interleaved rounds of at least 3 ms
    (or of the first 2, both FP32_PACKED_CLEAR past the margin), timed on the shape's first call
    and remembered."""
    key = (tokens, k, n, torch.get_num_threads())
    hit = FP32_PACKED.get(key)
    if hit is None:
        x, w, b = torch.full((tokens, k), 0.5), torch.full((n, k), 0.01), torch.zeros(n)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, tokens)
        with torch.no_grad():
            calls = {"F.linear": lambda: F.linear(x, w, b), "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")}
            seconds = time_calls(calls, rounds=3, min_seconds=3e-3, settled=packing_clear)
        hit = FP32_PACKED[key] = (packed_faster(seconds), {name: upper_median(t) for name, t in seconds.items()})
    return hit[0]


def packing_clear(seconds: dict) -> bool:
    """Whether two rounds or more, every one so far, put F.linear / packed FP32_PACKED_CLEAR past
    the margin on the same side (one round alone can be a spike of the host's; seconds as
    `packed_faster` takes them)."""
    ratios = [plain / packed for plain, packed in zip(seconds["F.linear"], seconds["packed"])]
    high, low = FP32_PACKED_MARGIN * FP32_PACKED_CLEAR, FP32_PACKED_MARGIN / FP32_PACKED_CLEAR
    return len(ratios) >= 2 and (all(r >= high for r in ratios) or all(r <= low for r in ratios))


def packed_faster(seconds: dict) -> bool:
    """Whether the median of the rounds' ratios F.linear / packed reaches FP32_PACKED_MARGIN
    (seconds: {"F.linear": [...], "packed": [...]}, seconds a call per round)."""
    return median_ratio(seconds["F.linear"], seconds["packed"]) >= FP32_PACKED_MARGIN


# (tokens, K, N, dtype, threads) of a packed linear -> (token count its weight's layout is packed
# for, {that count: seconds a call}). oneDNN blocks a packed weight by the token count it is made
# for (in blocks of 32 output columns for many tokens, of 64 for one), and at some bf16 shapes the
# one-token layout runs a many-token matmul faster, with no pattern in the shapes
# (`benchmarks/linear_layout_cpu.py` times both per SD1.5 shape). So each bf16 shape is timed
# once, at its first call; fp32 keeps oneDNN's own layout: the one-token layout won at no fp32
# SD1.5 shape (benchmarks/NOTES-cpu.md, the AMD host's fp32 linears). Read by benchmarks and tests.
LINEAR_LAYOUT: dict = {}
# The one-token layout must be this much faster: a near tie keeps oneDNN's own choice, so that
# timing noise flips few shapes between processes (the layouts sum in different orders).
LAYOUT_MARGIN = 1.1


def linear_layout(x2, rows_weight, bias) -> int:
    """The token count `rows_weight` [N, K] is packed for when it serves `x2` [tokens, K]: the
    tokens themselves, or 1 where `faster_layout` says so from 5 rounds of interleaved calls
    (two calls a round), timed on the first call of a bf16 shape."""
    tokens = x2.shape[0]
    key = (tokens, x2.shape[1], rows_weight.shape[0], x2.dtype, torch.get_num_threads())
    hit = LINEAR_LAYOUT.get(key)
    if hit is not None:
        return hit[0]
    if tokens <= 1 or x2.dtype != torch.bfloat16:
        LINEAR_LAYOUT[key] = (tokens, {})
        return tokens
    pack = torch.ops.mkldnn._reorder_linear_weight
    calls = {n: (lambda w=pack(rows_weight, n): torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [], "")) for n in (tokens, 1)}
    seconds = time_calls(calls, rounds=5, repeat=2)
    best = faster_layout(tokens, seconds)
    LINEAR_LAYOUT[key] = (best, {n: upper_median(t) for n, t in seconds.items()})
    return best


def faster_layout(tokens: int, seconds: dict) -> int:
    """1 where the one-token layout's calls ran LAYOUT_MARGIN faster than the `tokens` layout's
    (the median of the rounds' ratios; seconds: {token count: [seconds a call, per round]}),
    else tokens."""
    return 1 if median_ratio(seconds[tokens], seconds[1]) >= LAYOUT_MARGIN else tokens


def pack_linear(x2, rows_weight, bias):
    """oneDNN's packed copy of `rows_weight` [N, K] for `x2` [tokens, K], in the layout
    `linear_layout` picks (timed on the first call of the shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(rows_weight, linear_layout(x2, rows_weight, bias))


def _linear_packed(x, weight, bias, rows: slice, other=None, post: str = "none"):
    """x @ weight[rows].T + bias[rows] on a packed copy of those rows, then `post`: "none",
    "gelu", or with `other` (the output's shape) "add" or "mul". The copy's layout is chosen for
    the first call's shape (`linear_layout`); other token counts stay correct."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [tokens, K]
    b = None if bias is None else bias[rows]

    packed = packed_copy(weight, ("linear", rows.start, rows.stop), lambda: pack_linear(x2, weight[rows].contiguous(), b))
    if other is None:
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, b, post, [], "none" if post == "gelu" else "")
    else:
        o = other.reshape(-1, other.shape[-1]).contiguous()  # [tokens, N]
        y = torch.ops.mkldnn._linear_pointwise.binary(x2, o, packed, b, post)
    return y.view(*x.shape[:-1], y.shape[-1])


def linear(x, weight, bias, residual=None):
    """F.linear, plus `residual` (a tensor of the output's shape) when given: inside the matmul
    on the packed path (`PACKED_LINEAR`), after it elsewhere."""
    if packed_linear(x, weight) and (residual is None or residual.dtype == x.dtype):
        return _linear_packed(x, weight, bias, slice(0, weight.shape[0]), residual, "add" if residual is not None else "none")
    y = F.linear(x, weight, bias)
    return y if residual is None else y + residual


def linear_split(x, weights: tuple, biases: tuple, reuse: bool = False) -> tuple:
    """F.linear(x, w, b) for each weight of `weights` and bias of `biases` (None: no bias). On the
    packed path it is one matmul on the weights packed together, its output split into views: one
    wide matmul runs nearer the machine's rate than narrow ones (`benchmarks/linear_layout_cpu.py`
    times the widths). With `reuse` (an input that repeats, as the text's embeddings at every
    denoising step) the outputs are kept with a copy of `x` and returned again for the same input
    unchanged, or an equal one, while the weights are unchanged (one kept input per set of weights)."""
    width = sum(w.shape[0] for w in weights)
    if not all(packed_linear(x, w, width) for w in weights):
        return tuple(F.linear(x, w, b) for w, b in zip(weights, biases))
    slot = packed_copy(weights, ("reused",), lambda: [None]) if reuse else None  # emptied when a weight changes
    last = slot[0] if reuse else None  # (weakref to the kept input, its version, its copy, the outputs)
    version = tensor_version(x)  # None for an inference tensor (`.to(dtype)` under inference mode): a hit only by value
    if last is not None and ((version is not None and last[0]() is x and last[1] == version) or (last[2].shape == x.shape and last[2].dtype == x.dtype and torch.equal(last[2], x))):
        return last[3]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [tokens, K]

    def pack():
        together = torch.cat(weights)  # [sum of N, K]
        bias = None if all(b is None for b in biases) else torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(weights, biases)])
        return pack_linear(x2, together, bias), bias

    packed, bias = packed_copy(weights, ("split",), pack)
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")  # [tokens, sum of N]
    outs = tuple(y.view(*x.shape[:-1], y.shape[-1]).split([w.shape[0] for w in weights], dim=-1))
    if reuse:
        slot[0] = (weakref.ref(x), version, x.clone(), outs)
    return outs


def linear_geglu(x, weight, bias):
    """geglu(F.linear(x, weight, bias)): the SD feed-forward's projection and activation. On the
    packed path it is two matmuls, the gate's with gelu as a post-op and the value's multiplied
    by it as one, so the doubled-width projection is never written."""
    if not packed_linear(x, weight):
        return geglu(F.linear(x, weight, bias))
    inner = weight.shape[0] // 2
    gate = _linear_packed(x, weight, bias, slice(inner, 2 * inner), post="gelu")
    return _linear_packed(x, weight, bias, slice(0, inner), gate, "mul")


def layer_norm(x, weight, bias, eps: float):
    """LayerNorm over the last dimension."""
    return layer_norm_ref(x, weight, bias, eps)


# (q, k, v shapes and strides, dtype, device, scale) -> ("triton" or "torch", {name: ms}): which
# attention "auto" mode runs at that shape, timed once. Read by benchmarks and tests.
ATTENTION_CHOICE: dict = {}


def _attention_choice(q, k, v, scale) -> str:
    """"triton" or "torch": the faster at this shape, each timed with the [B, N, heads * d]
    reshape the models apply next (free on the kernel's output layout, maybe a copy on SDPA's).
    Untimed (CPU, interpreter, inside a graph capture): "triton", not remembered."""
    key = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, scale)
    if key in ATTENTION_CHOICE:
        return ATTENTION_CHOICE[key][0]
    from fastdiff.kernels import tuning
    from fastdiff.kernels.attention import MAX_HEAD_DIM
    from fastdiff.kernels.attention import attention as kernel

    if not tuning.can_time(q.device) or q.shape[-1] > MAX_HEAD_DIM:
        return "triton"  # over the kernel's largest head dim the launcher runs SDPA itself
    kernel(q, k, v, scale=scale)  # the kernel's own tuning (tile configs, key split) before the timing
    B, H, N, D = q.shape
    runs = {"triton": lambda: kernel(q, k, v, scale=scale), "torch": lambda: attention_ref(q, k, v, scale)}
    best, times = tuning.fastest(runs, lambda run: run().transpose(1, 2).reshape(B, N, H * D))
    ATTENTION_CHOICE[key] = (best, times)
    return best


def attention_path(q, k, v, causal: bool = False) -> str:
    """Which way `attention` runs: "triton" (the fused kernel, where "auto" mode may still pick
    SDPA per shape), "cpu" (bf16 on an AVX512-BF16 CPU in "auto" mode: `fastdiff.kernels.attention_cpu`,
    at the shapes where it ran faster than SDPA in benchmarks/attention_cpu.py) or "torch" (SDPA)."""
    if causal:
        return "torch"
    if _use_triton(q):
        return "triton"
    if q.dtype != torch.bfloat16 or not cpu_kernel_may_run(q, k, v):
        return "torch"
    try:
        from fastdiff.kernels import attention_cpu
    except ImportError:  # the kernels package needs triton (Linux x86_64): no AVX-512 elsewhere
        return "torch"
    usable = attention_cpu.supported(q, k, v) and attention_cpu.pays(q, k)
    return "cpu" if usable and attention_cpu.library() is not None else "torch"


def attention(q, k, v, scale: float | None = None, causal: bool = False):
    """Scaled dot-product attention, q/k/v in [B, heads, tokens, head_dim].

    `causal=True` (CLIP's 77-token text encoder, run once per prompt) always takes the torch
    reference: the fused kernels serve the UNet/VAE attention, which has no mask. In "auto" mode
    a shape where torch's SDPA timed faster than the Triton kernel runs SDPA (see
    `_attention_choice`); see `attention_path` for the CPU."""
    path = attention_path(q, k, v, causal)
    if path == "triton":
        from fastdiff.kernels.attention import attention as kernel

        if get_kernels() == "auto" and _attention_choice(q, k, v, scale) == "torch":
            return attention_ref(q, k, v, scale)
        return kernel(q, k, v, scale=scale)
    if path == "cpu":
        from fastdiff.kernels.attention_cpu import attention as kernel

        return kernel(q, k, v, scale)
    return attention_ref(q, k, v, scale, causal)


def geglu(h):
    """x * gelu(gate) where (x, gate) = h.chunk(2, -1): the SD feed-forward activation."""
    if _use_triton(h):
        from fastdiff.kernels.geglu import geglu as kernel

        return kernel(h)
    return geglu_ref(h)


def silu(x):
    return F.silu(x)


def gelu(x):
    return F.gelu(x)


def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)
