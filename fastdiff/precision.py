"""Which dtype the networks run in, decided by what the device can run fast, not by its name.

CUDA: float16. CPU: bfloat16 where the CPU has bf16 matmul instructions (AMX-BF16 or
AVX512-BF16) and, on an AMX CPU, the model is large enough for bf16 to pay (BF16_MIN_UNET_PARAMS);
float32 elsewhere. Without those instructions torch runs bf16 and fp16 matmuls emulated, many
times slower than float32 (`benchmarks/latency.py --dtype` measures it on a machine), so asking
for one there is an error rather than a slow surprise. Latents and the scheduler's math stay
float32 whatever this says (see fastdiff.pipeline).

Per network: the text encoder, UNet and VAE decoder share the dtype. On an AMX CPU, and on an
AVX512-BF16 one without AMX, bf16 made each of SD1.5's three faster, with the decoded image
within the error the UNet's bf16 already brings (`benchmarks/network_dtypes.py`; figures in
benchmarks/NOTES-cpu.md), so no network is kept in float32.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("fastdiff")

# CPU flags (Linux /proc/cpuinfo names) that give a dtype native matmuls. AVX512-FP16 alone does
# not: torch's fp16 matmul ran slower than its fp32 one on a CPU with it and without AMX-FP16
# (benchmarks/latency.py's matmul rates; benchmarks/NOTES-cpu.md), so fp16 needs AMX-FP16.
FAST_FLAGS = {
    torch.bfloat16: ("amx_bf16", "avx512_bf16"),
    torch.float16: ("amx_fp16",),
}
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# On an AMX CPU bf16 paid for its casts and weight reorders only when the networks do enough work
# per call: the embedded model's small UNet ran slower in bf16 than in float32 there, SD1.5's more
# than twice as fast (`benchmarks/network_dtypes.py --model tiny-shapes` and the default). On an
# AVX512-BF16 CPU without AMX the embedded model's networks ran faster in bf16 too (the same
# benchmark; NOTES-cpu.md's Zen5 section), so the size rule holds where the CPU has AMX
# (SIZE_RULE_FLAGS).
# The UNet's parameter count, read from its weights file's header, stands for the model's size.
BF16_MIN_UNET_PARAMS = 100_000_000
SIZE_RULE_FLAGS = ("amx_bf16",)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them; empty where /proc/cpuinfo is absent (then
    only float32 counts as fast)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_runs_fast(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU has native matmul instructions for `dtype` (float32 always)."""
    if dtype == torch.float32:
        return True
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in FAST_FLAGS.get(dtype, ()))


def default_dtype(
    device: torch.device, supported: tuple[torch.dtype, ...] | None = None, unet_params: int | None = None
) -> torch.dtype:
    """The networks' dtype when the caller names none: $FASTDIFF_DTYPE if set (checked like an
    argument), else by capability and, on an AMX CPU, the model's size (`unet_params`; None: large);
    float32 where the backend lacks (`supported`) that dtype."""
    return _default(device, supported, unet_params)[0]


def _default(device, supported, unet_params) -> tuple[torch.dtype, str]:
    """default_dtype's choice and why, in one place (choose_dtype logs the why)."""
    if os.environ.get("FASTDIFF_DTYPE"):
        return check_dtype(device, os.environ["FASTDIFF_DTYPE"], name="FASTDIFF_DTYPE"), "FASTDIFF_DTYPE"
    if device.type == "cuda":
        chosen, why = torch.float16, "CUDA"
    elif device.type != "cpu" or not cpu_runs_fast(torch.bfloat16):
        chosen, why = torch.float32, "no bf16 matmul instructions"
    elif unet_params is not None and unet_params < BF16_MIN_UNET_PARAMS and any(f in cpu_flags() for f in SIZE_RULE_FLAGS):
        chosen, why = torch.float32, f"a {unet_params / 1e6:.1f}M-parameter UNet, too small for bf16 to pay on AMX"
    else:
        chosen, why = torch.bfloat16, "bf16 matmul instructions"
    if supported is not None and chosen not in supported:
        return torch.float32, "the backend runs float32 only"
    return chosen, why


def check_dtype(device: torch.device, dtype, name: str = "dtype") -> torch.dtype:
    """`dtype` (a torch dtype or its name) as a torch dtype, or a ValueError naming the argument:
    an unknown dtype, or a 16-bit one on a CPU without native instructions for it."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPE_NAMES:
            raise ValueError(f"{name}={dtype!r}: allowed values are {', '.join(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype.removeprefix("torch.")]
    if dtype not in DTYPE_NAMES.values():
        raise ValueError(f"{name}={dtype!r}: allowed values are {', '.join(f'torch.{n}' for n in DTYPE_NAMES)}")
    if device.type == "cpu" and not cpu_runs_fast(dtype):
        need = " or ".join(f.upper() for f in FAST_FLAGS[dtype])
        raise ValueError(
            f"{name}={dtype}: this CPU has no {need} instructions, so torch would emulate {dtype} matmuls, "
            "many times slower than float32; use dtype=torch.float32 (the default here)"
        )
    return dtype


def choose_dtype(
    device: torch.device, dtype=None, supported: tuple[torch.dtype, ...] | None = None, unet_params: int | None = None
) -> torch.dtype:
    """The checked dtype asked for, else the default for the device, a backend that runs
    `supported` and a model of `unet_params`; logs a CPU default and why."""
    if dtype is not None:
        return check_dtype(device, dtype)
    chosen, why = _default(device, supported, unet_params)
    if device.type == "cpu" and why != "FASTDIFF_DTYPE":
        log.info("fastdiff: dtype %s on this CPU (%s; dtype= overrides)", chosen, why)
    return chosen
