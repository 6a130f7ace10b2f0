"""The Triton kernels compiled (not run) for sm_90 at SD1.5's shapes, on any machine: resources and
the instructions that decide speed, read from the cubin with the cuobjdump Triton ships.

    python benchmarks/sm90_build.py            # table: registers, spills, wgmma, load/store widths
    python benchmarks/sm90_build.py --json     # the same as one JSON line (tests/test_kernels.py)

Each case is built with the specialisation the JIT gives the real call (ints equal to 1 become
constants, multiples of 16 are hinted as such, pointers 16-byte aligned); attention once for every
tile config the autotuner keeps at SD's self-attention shapes. What it shows without a GPU: register spills (stack bytes), whether
the matmuls are Hopper's warpgroup MMA (HGMMA) rather than the older HMMA, and whether global
loads and stores are 16-byte vectors (LDG.E.128). Triton decides interpreted vs compiled per
process, so this must run without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def cases() -> dict:
    """name -> (Launch, tile config or None): the kernel calls the launchers make at SD1.5's shapes
    in fp16, on meta tensors (shapes and strides only). An autotuned call comes once per config the
    autotuner keeps at that shape."""
    import dataclasses

    import torch
    from triton.runtime.autotuner import Autotuner

    from fastdiff.kernels import attention, geglu, group_norm

    def tensor(shape, strides=None, dtype=torch.float16):
        strides = strides or torch.empty(shape, device="meta").stride()
        return torch.empty_strided(shape, strides, device="meta", dtype=dtype)

    out = {}

    def attention_cases(name, q, k, v, o, splits=1, keep=None):
        """Add the call once per tile config (the autotuner's pruned set, or `keep`); returns the
        configs and the merge call of a key split (if any)."""
        main, *combine = attention.launches(q, k, v, o, 0.1, splits)
        configs = [keep] if keep else main.kernel.early_config_prune(main.kernel.configs, named_args(main), **main.meta)
        for c in configs:
            tile = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
            tile += ("_split" if c.kwargs["SPLIT_D"] else "") + ("_overlap" if c.kwargs["OVERLAP_QK"] else "")
            out[name.format(tile=tile)] = (main, c)
        return configs, combine

    # Self-attention over a packed [2, S, 3, 8, D] projection at each head dim's sequence length,
    # key tail masked (S + 3 keys): every config the autotuner may pick there; the OVERLAP_QK ones
    # also as SD runs them, S keys with no tail ("_even"); at S = 256 also split along the keys.
    B, H = 2, 8
    for D, S in ((40, 4096), (80, 1024), (160, 256)):
        qkv = (S * 3 * H * D, D, 3 * H * D, 1)  # batch, head, token, dim strides of q, k and v
        q, o = tensor((B, H, S, D), qkv), tensor((B, H, S, D), (S * H * D, D, H * D, 1))
        kv_tail, kv = tensor((B, H, S + 3, D), qkv), tensor((B, H, S, D), qkv)
        configs, _ = attention_cases(f"attention_d{D}_{{tile}}", q, kv_tail, kv_tail, o)
        for c in configs:
            if c.kwargs["OVERLAP_QK"]:
                attention_cases(f"attention_d{D}_{{tile}}_even", q, kv, kv, o, keep=c)
            if S == 256:
                _, (combine,) = attention_cases(f"attention_d{D}_{{tile}}_keysplit", q, kv, kv, o, 2, keep=c)
                out[f"attention_combine_d{D}"] = (combine, None)
    # The embedded model's smallest head (D = 8, padded to 16) with rows padded by one element, so
    # no stride is a multiple of 8 (STRIDE_ALIGN = 1): the generic path the alignment hint skips.
    B, S, H, D = 2, 64, 4, 8
    odd = (S * (H * D + 1), D, H * D + 1, 1)
    q, kv = tensor((B, H, S, D), odd), tensor((B, H, 77, D), odd)
    smallest = attention.launches(q, kv, kv, q, 0.1, 1)[0].kernel.configs[-1]
    attention_cases("attention_d8_unaligned", q, kv, kv, q, keep=smallest)

    # GroupNorm at SD's first UNet level: the two-pass plan at its finest split (both orders of its
    # second pass; "_r" is the last-first order the tuner offers beyond L2) and one program per
    # group, in both layouts, and with one channel per group (BLOCK_C = 1).
    def group_norm_calls(plan, x3):
        C = x3.shape[1]
        return group_norm.launches(plan, x3, x3, tensor((C,)), tensor((C,)), 32, 1e-5, True)

    orders = ((False, ""), (True, "_r"))
    B, HW = 2, 64 * 64
    for C, suffix, layouts in ((320, "", ("nchw", "nhwc")), (32, "_c1", ("nchw",))):
        plans = group_norm.plans(B, C, HW, 32, torch.device("cpu"))
        split = list(plans.values())[-1]  # split16: the most chunks
        for layout in layouts:
            x3 = tensor((B, C, HW), (C * HW, HW, 1) if layout == "nchw" else (C * HW, 1, C))
            for last_first, r in orders:
                stats, apply = group_norm_calls(dataclasses.replace(split, last_first=last_first), x3)
                out[f"group_norm_stats_{layout}{suffix}"] = (stats, None)
                out[f"group_norm_apply_{layout}{suffix}{r}"] = (apply, None)
            (out[f"group_norm_fused_{layout}{suffix}"],) = [(c, None) for c in group_norm_calls(plans["fused"], x3)]
    # The channels-last plan (blocks of 64 channels, 128 bytes, per program) and the NCHW flat
    # plan's apply (its statistics kernel is group_norm_stats_nchw_c1's) at the same shape.
    C = 320
    for layout, strides in (("nhwc", (C * HW, 1, C)), ("flat", (C * HW, HW, 1))):
        plan = list(group_norm.plans(B, C, HW, 32, torch.device("cpu"), "nhwc" if layout == "nhwc" else "nchw").values())[-1]
        for last_first, r in orders:
            calls = group_norm_calls(dataclasses.replace(plan, last_first=last_first), tensor((B, C, HW), strides))
            if layout == "nhwc":
                out["group_norm_nhwc_stats"], out["group_norm_nhwc_finalize"] = (calls[0], None), (calls[1], None)
            out[f"group_norm_{layout}_apply{r}"] = (calls[-1], None)

    (out["geglu"],) = [(c, None) for c in geglu.launches(tensor((8192, 2560)), tensor((8192, 1280)))]
    assert not any(isinstance(launch.kernel, Autotuner) and c is None for launch, c in out.values())
    return out


def named_args(launch) -> dict:
    """The call's runtime arguments by the kernel's parameter names."""
    return dict(zip(jit_function(launch.kernel).arg_names, launch.args))


def jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # through Autotuner and Heuristics
    return kernel


def specialise(launch, config) -> tuple[dict, dict, int, int]:
    """(runtime args by name, constexprs, num_warps, num_stages) as Triton's JIT would compile the
    call: the tile config's values, then the heuristics' (computed from everything before)."""
    from triton.runtime.autotuner import Heuristics
    from triton.runtime.jit import JITFunction

    meta = dict(launch.meta)
    num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
    if config is not None:
        meta.update(config.kwargs)
        num_warps, num_stages = config.num_warps, config.num_stages
    args = named_args(launch)
    kernel = launch.kernel
    while not isinstance(kernel, JITFunction):  # Autotuner, then Heuristics, then the kernel
        if isinstance(kernel, Heuristics):
            meta.update({name: rule({**args, **meta}) for name, rule in kernel.values.items()})
        kernel = kernel.fn
    return args, meta, num_warps, num_stages


def build(launch, config) -> bytes:
    """The sm_90 cubin of one call, with the specialisation the JIT gives it: ints equal to 1
    become constants, ints divisible by 16 and pointers (assumed 16-byte aligned) are hinted so."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = jit_function(launch.kernel)
    args, constexprs, num_warps, num_stages = specialise(launch, config)
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constexprs or (not isinstance(value, torch.Tensor) and value == 1):
            constants.setdefault(name, value)
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(ASTSource(kernel, signature, constants, attrs), GPUTarget("cuda", 90, 32), options).asm["cubin"]


def inspect(cubin: bytes) -> dict:
    """Registers, stack (spill) and static shared bytes per thread/block, and SASS instruction
    counts: HGMMA (warpgroup MMA), HMMA, and global loads/stores by width (LDG.E.128 = 16 bytes).
    "ex2_under_wgmma": exp2s (MUFU.EX2) placed, in program order, after a wgmma is issued and
    before the next wgmma wait (WARPGROUP.DEPBAR): softmax work overlapping the tensor cores."""
    import triton

    cuobjdump = triton.knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    res = {k.lower(): int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK", "SHARED")}
    counts: dict = {}
    for op in re.findall(r"\b(HGMMA|HMMA|(?:LDG|STG)(?:\.[A-Z0-9]+)*)\b", sass):
        counts[op] = counts.get(op, 0) + 1
    res["sass"] = counts
    res["instructions"] = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/\s+\S", sass, flags=re.M))  # every SASS line
    in_flight, overlapped = False, 0
    for op in re.findall(r"\b(HGMMA|WARPGROUP\.DEPBAR|MUFU\.EX2)\b", sass):
        if op == "HGMMA":
            in_flight = True
        elif op == "WARPGROUP.DEPBAR":
            in_flight = False
        else:
            overlapped += in_flight
    res["ex2_under_wgmma"] = overlapped
    return res


def available() -> str | None:
    """None when this triton can build sm_90 code here, else why not."""
    try:
        import triton

        tools = (triton.knobs.nvidia.ptxas.path, triton.knobs.nvidia.cuobjdump.path)
        if all(Path(p).exists() for p in tools):
            return None
    except Exception:  # noqa: BLE001 - no triton, or a build without the NVIDIA backend
        pass
    return "this triton has no ptxas / cuobjdump to build sm_90 code with"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON line: name -> inspect() result")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot build cubins", file=sys.stderr)
        return 2
    why = available()
    if why:
        print(why)
        return 3
    report = {}
    for name, (launch, config) in cases().items():
        report[name] = inspect(build(launch, config))
        _, constexprs, num_warps, _ = specialise(launch, config)
        report[name]["meta"] = {k: v for k, v in constexprs.items() if k.isupper()} | {"num_warps": num_warps}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'kernel':36} {'regs':>5} {'spill B':>7} {'smem B':>7} {'ex2||mma':>8} {'instr':>6}  SASS")
    for name, r in report.items():
        sass = " ".join(f"{k}:{v}" for k, v in sorted(r["sass"].items()))
        row = f"{r['reg']:5} {r['stack']:7} {r['shared']:7} {r['ex2_under_wgmma']:8} {r['instructions']:6}"
        print(f"{name:36} {row}  {sass}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
