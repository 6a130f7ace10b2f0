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
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


# GroupNorm's second passes in both grid orders: (LAST_FIRST, name suffix); "_r" builds the
# last-first variant the tuner offers for inputs beyond L2.
ORDERS = ((False, ""), (True, "_r"))


def cases() -> dict:
    """name -> (kernel, args, constexprs, num_warps, num_stages) at SD1.5 shapes, fp16.

    args: name -> pointer type ("*fp16", assumed 16-byte aligned), float, or int value."""
    import torch
    import triton

    attn = importlib.import_module("fastdiff.kernels.attention")
    gn = importlib.import_module("fastdiff.kernels.group_norm")
    geglu = importlib.import_module("fastdiff.kernels.geglu")
    out = {}

    def attention_case(name, B, H, S, Sk, D, strides_qkv, strides_o, align, config, even_n=False, splits=1):
        args = dict(Q="*fp16", K="*fp16", V="*fp16", Out="*fp16", num_heads=H, SEQ_Q=S, SEQ_K=Sk, qk_scale=0.1)
        args.update(Partials="*fp32" if splits > 1 else "*fp16", NUM_SPLITS=splits)
        for t, strides in (("q", strides_qkv), ("k", strides_qkv), ("v", strides_qkv), ("o", strides_o)):
            args.update({f"stride_{t}{n}": s for n, s in zip("bhmd" if t in "qo" else "bhnd", strides)})
        a, b = attn._head_dim_parts(D, config.kwargs["SPLIT_D"])
        meta = dict(HEAD_DIM=D, DOT_PRECISION="tf32", STRIDE_ALIGN=align, EVEN_N=even_n, HEAD_DIM_A=a, HEAD_DIM_B=b)
        meta["SPLIT_K"] = splits > 1
        out[name] = (attn._attention_kernel, args, dict(meta, **config.kwargs), config.num_warps, config.num_stages)

    # Self-attention over a packed [2, S, 3, 8, D] projection at each head dim's sequence length,
    # key tail masked (S + 3 keys): every config the autotuner may pick there, padded and split
    # head dim; the OVERLAP_QK ones also as SD runs them, S keys with no tail ("_even").
    for D, S in ((40, 4096), (80, 1024), (160, 256)):
        B, H = 2, 8
        named = {"Q": torch.empty(0, dtype=torch.float16), "SEQ_Q": S, "SEQ_K": S}
        qkv = (S * 3 * H * D, D, 3 * H * D, 1)  # batch, head, token, dim strides of q, k and v
        for c in attn._prune_configs(attn._configs(), named, HEAD_DIM=D):
            tile = f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}"
            name = f"attention_d{D}_{tile}" + ("_split" if c.kwargs["SPLIT_D"] else "")
            name += "_overlap" if c.kwargs["OVERLAP_QK"] else ""
            attention_case(name, B, H, S, S + 3, D, qkv, (S * H * D, D, H * D, 1), 8, c)
            if c.kwargs["OVERLAP_QK"]:
                attention_case(name + "_even", B, H, S, S, D, qkv, (S * H * D, D, H * D, 1), 8, c, even_n=True)
            if S == 256:  # short queries: also the key-split variant that writes partial results
                attention_case(name + "_keysplit", B, H, S, S, D, qkv, (S * H * D, D, H * D, 1), 8, c, even_n=True, splits=2)
    # The merge of the key-split partial results at D = 160 (padded to 256, 16 rows per program).
    combine = dict(Partials="*fp32", Out="*fp16", num_heads=8, SEQ_Q=256, NUM_SPLITS=2)
    combine.update({f"stride_o{n}": s for n, s in zip("bhmd", (256 * 8 * 160, 160, 8 * 160, 1))})
    out["attention_combine_d160"] = (
        attn._attention_combine_kernel, combine, dict(HEAD_DIM=160, HEAD_DIM_P2=256, BLOCK_M=16), 4, 3,
    )  # fmt: skip
    # The embedded model's smallest head (D = 8, padded to 16) with rows padded by one element, so
    # no stride is a multiple of 8 (STRIDE_ALIGN = 1): the generic path the alignment hint skips.
    B, S, H, D = 2, 64, 4, 8
    odd = (S * (H * D + 1), D, H * D + 1, 1)
    attention_case("attention_d8_unaligned", B, H, S, 77, D, odd, odd, 1, attn._configs()[-1])

    # GroupNorm at SD's first UNet level in both layouts, and one channel per group (BLOCK_C = 1):
    # the two-pass kernels at their finest split, and the one-program-per-group kernel.
    for C, G, suffix, layouts in ((320, 32, "", ("nchw", "nhwc")), (32, 32, "_c1", ("nchw",))):
        B, HW = 2, 64 * 64
        plan = list(gn._plans(B, C, HW, G, torch.device("cpu")).values())[-1]  # split16: the most chunks
        for layout in layouts:
            strides = (C * HW, HW, 1) if layout == "nchw" else (C * HW, 1, C)  # batch, channel, spatial
            x_strides = {f"stride_x{n}": s for n, s in zip(("b", "c", "hw"), strides)}
            y_strides = {f"stride_y{n}": s for n, s in zip(("b", "c", "hw"), strides)}
            meta = dict(CHANNELS_PER_GROUP=C // G, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw)
            split = dict(HW=HW, num_groups=G, HW_PER_SPLIT=plan.hw_per_split, SPLIT=plan.split, Partials="*fp32")
            out[f"group_norm_stats_{layout}{suffix}"] = (
                gn._group_norm_stats_kernel, dict(X="*fp16", **split, **x_strides), meta, gn._NUM_WARPS, 3,
            )  # fmt: skip
            io = dict(X="*fp16", Y="*fp16", Weight="*fp16", Bias="*fp16", eps=1e-5, **x_strides, **y_strides)
            for last_first, r in ORDERS:
                apply_meta = dict(meta, BLOCK_SPLIT=gn._MERGE_BLOCK, SILU=True, LAST_FIRST=last_first)
                out[f"group_norm_apply_{layout}{suffix}{r}"] = (
                    gn._group_norm_apply_kernel, dict(io, **split), apply_meta, gn._NUM_WARPS, 3,
                )  # fmt: skip
            fused = dict(io, HW=HW, num_groups=G)
            out[f"group_norm_fused_{layout}{suffix}"] = (
                gn._group_norm_kernel, fused, dict(meta, SILU=True), gn._NUM_WARPS, 3,
            )  # fmt: skip

    # The channels-last plan at the same shape: blocks of 64 channels (128 bytes) per program.
    B, C, G, HW = 2, 320, 32, 64 * 64
    plan = list(gn._plans(B, C, HW, G, torch.device("cpu"), "nhwc").values())[-1]
    strides = dict(stride_xb=C * HW, stride_xc=1, stride_xhw=C, stride_yb=C * HW, stride_yc=1, stride_yhw=C)
    chunks = dict(C=C, HW=HW, HW_PER_SPLIT=plan.hw_per_split)
    tiles = dict(BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw)
    out["group_norm_nhwc_stats"] = (
        gn._group_norm_nhwc_stats_kernel,
        dict(X="*fp16", Partials="*fp32", SPLIT=plan.split, **chunks, **{n: v for n, v in strides.items() if "_x" in n}),
        tiles, gn._NUM_WARPS, 3,
    )  # fmt: skip
    out["group_norm_nhwc_finalize"] = (
        gn._group_norm_nhwc_finalize_kernel,
        dict(X="*fp16", stride_xb=C * HW, stride_xc=1, Partials="*fp32", Weight="*fp16", Bias="*fp16",
             ScaleShift="*fp32", B=B, HW=HW,
             HW_PER_SPLIT=plan.hw_per_split, SPLIT=plan.split, num_groups=G, eps=1e-5),
        dict(CHANNELS_PER_GROUP=C // G, BLOCK_CG=triton.next_power_of_2(C // G),
             BLOCK_SPLIT=gn._finalize_rows(C // G)),
        gn._NUM_WARPS, 3,
    )  # fmt: skip
    for last_first, r in ORDERS:
        out[f"group_norm_nhwc_apply{r}"] = (
            gn._group_norm_nhwc_apply_kernel, dict(X="*fp16", Y="*fp16", ScaleShift="*fp32", **chunks, **strides),
            dict(tiles, SILU=True, LAST_FIRST=last_first), gn._NUM_WARPS, 3,
        )  # fmt: skip

    # The NCHW flat plan's apply at the same shape (its statistics kernel is group_norm_stats_nchw_c1's).
    plan = list(gn._plans(B, C, HW, G, torch.device("cpu"), "nchw").values())[-1]
    row = gn._row(HW)
    for last_first, r in ORDERS:
        out[f"group_norm_flat_apply{r}"] = (
            gn._group_norm_flat_apply_kernel,
            dict(X="*fp16", Y="*fp16", Weight="*fp16", Bias="*fp16", Partials="*fp32", stride_b=C * HW, HW=HW,
                 num_groups=G, PER_SPLIT=plan.hw_per_split, SPLIT=plan.split, eps=1e-5),
            dict(CHANNELS_PER_GROUP=C // G, ROW=row, BLOCK_R=gn._TILE // row,
                 BLOCK_SPLIT=gn._MERGE_BLOCK, SILU=True, LAST_FIRST=last_first),
            gn._NUM_WARPS, 3,
        )  # fmt: skip

    block_m, block_n = geglu._plan(1280)
    args = dict(H="*fp16", Out="*fp16", stride_hm=2560, M=8192, N=1280)
    out["geglu"] = (geglu._geglu_kernel, args, dict(BLOCK_M=block_m, BLOCK_N=block_n), geglu._NUM_WARPS, 3)
    return out


def build(kernel, args: dict, constexprs: dict, num_warps: int, num_stages: int) -> bytes:
    """The sm_90 cubin of one case."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn  # through Autotuner and Heuristics
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in constexprs or value == 1:
            constants.setdefault(name, value)
            signature[name] = "constexpr"
        elif isinstance(value, str):
            signature[name] = value
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
    for name, (kernel, kargs, constexprs, num_warps, num_stages) in cases().items():
        report[name] = inspect(build(kernel, kargs, constexprs, num_warps, num_stages))
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
