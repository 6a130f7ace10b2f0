"""Where one UNet step's GPU time goes: kernel time by category, fastdiff's Triton kernels vs torch's ops.

    python benchmarks/profile_step.py                       # SD1.5 UNet, 512x512, CFG batch 2, fp16, CUDA
    python benchmarks/profile_step.py --json profile.json
    python benchmarks/profile_step.py --device cpu --arch tiny   # the code path, on CPU (tests)
    python benchmarks/profile_step.py --device cpu --network vae  # the VAE decode of one image instead

The UNet is built from SD1.5's config with random weights (speed does not depend on the values),
channels-last on CUDA as the pipeline runs it. After a warm-up (autotuning, plan tuning), a few
eager forwards run under torch.profiler; each GPU kernel's time is summed into a category by its
name (attention, GroupNorm, GEGLU, LayerNorm, convolution, matmul, other). Kernel time does not
include launch gaps, so the total is close to what the captured CUDA-graph step costs. Run once
with the Triton kernels and once with torch's ops, so each category's change is side by side.
On CPU the rows are aten operators' own (self) CPU time instead of kernels, in "auto" mode (the
CPU default) and "torch" mode, with the process's allocator set as a CPU torch backend sets it
(fastdiff.allocator; FASTDIFF_CPU_ALLOCATOR=system profiles glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

# (category, pattern on the kernel or aten op name), first match wins. Triton kernels are named
# after their @triton.jit function; cuDNN convolutions say fprop/conv, cuBLAS/cuDNN matmuls
# gemm/nvjet/cutlass; torch's own norms name themselves.
CATEGORIES = [
    ("attention (triton)", r"^_attention(_combine)?_kernel\b"),
    ("attention (cpu)", r"^fastdiff::attention_cpu$"),  # kernels/attention_cpu.py, a ctypes call
    ("attention (sdpa)", r"fmha|flash|sdpa|scaled_dot_product|attention"),
    ("group_norm (triton)", r"^_group_norm_\w*kernel\b"),
    ("group_norm (cpu)", r"^fastdiff::group_norm_nhwc$"),  # kernels/group_norm_cpu.py, a ctypes call
    ("group_norm (torch)", r"group_norm|GroupNorm|RowwiseMoments|ComputeFusedParams"),
    ("geglu (triton)", r"^_geglu_kernel\b"),
    ("layer_norm", r"layer_norm|LayerNorm"),
    ("convolution (amx)", r"^fastdiff::matmul_few_rows$"),  # kernels/matmul_few_rows_cpu.py, a ctypes call
    # kernels/winograd_cpu.py: its two transforms (ctypes calls); its 16 matmuls count as matmul
    ("convolution (winograd transforms)", r"^fastdiff::winograd_cpu$"),
    ("convolution", r"fprop|conv(?!ert)|implicit_gemm|dgrad|winograd"),
    ("matmul", r"gemm|nvjet|cutlass|cublas|addmm|\bmm\b|aten::mm|aten::bmm|aten::linear|mkldnn::_linear_pointwise"),
    ("copies/reorders", r"aten::(copy_|contiguous|_to_copy|clone|cat)\b"),
]


def categorize(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def aggregate(kernels: list[tuple[str, float, int]], calls: int) -> dict:
    """(name, microseconds, launches) of the kernels over `calls` forwards -> per-forward ms and
    launch counts by category, and the ten costliest kernel names."""
    by_cat: dict = {}
    by_name: dict = {}
    for name, us, launches in kernels:
        c = by_cat.setdefault(categorize(name), {"ms": 0.0, "launches": 0})
        c["ms"] += us / 1000 / calls
        c["launches"] += launches
        by_name[name] = by_name.get(name, 0.0) + us / 1000 / calls
    for c in by_cat.values():
        c["launches"] = round(c["launches"] / calls)
    total = sum(c["ms"] for c in by_cat.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {"total_ms": total, "categories": by_cat, "top": [{"name": n[:90], "ms": ms} for n, ms in top]}


def build_unet(arch: str, device: torch.device, dtype: torch.dtype):
    from fastdiff import testing
    from fastdiff.models.unet import UNet2DConditionModel, UNetConfig

    unet_cfg = testing.architecture(arch)[0]
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: SD1.5's 860M parameters init slowly on CPU
        unet = UNet2DConditionModel(UNetConfig.from_dict(unet_cfg)).eval().to(dtype)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def build_vae(arch: str, device: torch.device, dtype: torch.dtype):
    from fastdiff import testing
    from fastdiff.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(VAEConfig.from_dict(testing.architecture(arch)[1])).eval().to(dtype)
    if device.type == "cuda":
        vae = vae.to(memory_format=torch.channels_last)
    return vae


def profile(net, inputs, kernels: str, device: torch.device, calls: int = 3) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from fastdiff import ops

    def forward():
        with torch.inference_mode(), ops.kernels(kernels):
            net(*inputs)

    for _ in range(2):  # autotuning, plan tuning, cuDNN algorithm choice
        forward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as prof:
        for _ in range(calls):
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    if device.type == "cuda":
        cuda = torch.autograd.DeviceType.CUDA
        # A kernel event's own interval: its duration on the GPU (device_time_total reads 0
        # for events recorded without a device-use flag).
        kernels_us = [(e.name, e.time_range.elapsed_us(), 1) for e in prof.events() if e.device_type == cuda]
    else:  # aten (and oneDNN) ops' self time: no double counting of nested ops
        averages = prof.key_averages()
        kernels_us = [(e.key, e.self_cpu_time_total, e.count) for e in averages if e.key.startswith(("aten::", "mkldnn::", "fastdiff::"))]
        kernels_us = [k for k in kernels_us if k[1] > 0]
    return aggregate(kernels_us, calls)


def format_table(results: dict) -> str:
    if any(r["total_ms"] <= 0 for r in results.values()):
        return "no kernel time recorded: " + json.dumps({m: r["total_ms"] for m, r in results.items()})
    modes = list(results)
    cats = sorted({c for r in results.values() for c in r["categories"]}, key=lambda c: -max(
        r["categories"].get(c, {"ms": 0})["ms"] for r in results.values()))
    lines = [f"{'category':22}" + "".join(f" {m + ' ms':>12} {'%':>5} {'launches':>8}" for m in modes)]
    for c in cats + ["total"]:
        row = f"{c:22}"
        for m in modes:
            r = results[m]
            if c == "total":
                row += f" {r['total_ms']:12.3f} {100:5.0f} {'':>8}"
                continue
            v = r["categories"].get(c, {"ms": 0.0, "launches": 0})
            row += f" {v['ms']:12.3f} {100 * v['ms'] / r['total_ms']:5.0f} {v['launches']:8d}"
        lines.append(row)
    for m in modes:
        lines.append(f"costliest kernels ({m}):")
        lines += [f"  {t['ms']:8.3f} ms  {t['name']}" for t in results[m]["top"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", choices=["sd15", "tiny"], default="sd15")
    parser.add_argument("--network", choices=["unet", "vae"], default="unet",
                        help="unet: one step, CFG batch 2; vae: the decode of one image")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--calls", type=int, default=3, help="profiled forwards per mode")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: what fastdiff.precision picks for the device (bf16 on CPUs with bf16 instructions)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/profile_step.py needs a CUDA device (or --device cpu).")
        return 0
    from fastdiff import precision

    dtype = precision.choose_dtype(device, args.dtype)
    if device.type == "cpu":
        from fastdiff import allocator

        allocator.keep_freed_memory()  # as the CPU torch backend runs
    side = args.size // 8
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if args.network == "vae":
        vae = build_vae(args.arch, device, dtype)
        net = vae.decode
        latents = torch.randn(1, vae.config.latent_channels, side, side, device=device, dtype=dtype)
        inputs = (latents.contiguous(memory_format=memory_format),)
        what = "VAE decode"
    else:
        net = build_unet(args.arch, device, dtype)
        cfg = net.config
        inputs = (
            torch.randn(2, cfg.in_channels, side, side, device=device, dtype=dtype).contiguous(memory_format=memory_format),
            torch.tensor(500.0, device=device),
            torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dtype),
        )
        what = "UNet"
    # On the CPU "auto" differs from "torch" only in the convolutions (ops.SMALL_CONV_PIXELS).
    modes = ["triton", "torch"] if device.type == "cuda" else ["auto", "torch"]
    results = {m: profile(net, inputs, m, device, args.calls) for m in modes}
    batch = 1 if args.network == "vae" else 2
    print(f"{what} {args.arch}, {args.size}x{args.size}, batch {batch}, {dtype}, {device}: time per forward by category")
    print(format_table(results))
    if args.json:
        from fastdiff import testing

        record = {"arch": args.arch, "network": args.network, "size": args.size, "dtype": str(dtype), "environment": testing.environment(device)}
        args.json.write_text(json.dumps({**record, "results": results}, indent=2) + "\n")
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
