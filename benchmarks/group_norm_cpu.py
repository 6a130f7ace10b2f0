"""CPU GroupNorm (+ SiLU) at SD1.5's shapes on channels-last input (what the packed convolutions
return): torch's F.group_norm then F.silu against fastdiff's kernel
(`fastdiff.kernels.group_norm_cpu`, what "auto" mode runs on a CPU with AVX-512), side by side.

    python benchmarks/group_norm_cpu.py                   # 512x512 images, bf16
    python benchmarks/group_norm_cpu.py --size 256 --dtype float32 --json gn.json

Shapes come from running SD1.5's UNet (CFG batch 2) and VAE decoder (batch 1) on the meta device
with torch's ops, recording each F.group_norm call and whether SiLU follows it.
The process's allocator is set as a CPU torch backend sets it (fastdiff.allocator). Each shape is
timed interleaved after a warm-up call each, median of `--repeats`; totals weigh each shape by
its calls per forward. The error columns are each way's largest difference from float64,
relative to the output's largest value. Random inputs.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastdiff import allocator, ops, testing
from fastdiff.kernels import group_norm_cpu

class NormRecorder(TorchFunctionMode):
    """Records each F.group_norm call's (input shape, groups) and whether F.silu takes its output next."""

    def __init__(self, network: str, calls: list):
        super().__init__()
        self.network, self.calls, self.last = network, calls, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.group_norm:
            self.calls.append([self.network, tuple(args[0].shape), args[1], False])
            self.last = out
        elif func is F.silu and args[0] is self.last:
            self.calls[-1][3] = True
        return out


def norm_shapes(size: int) -> collections.Counter:
    """(network, input shape, groups, silu) -> calls in one forward (UNet) or decode (VAE)."""
    calls: list = []
    unet, vae = testing.sd15_on_meta()
    with NormRecorder("unet", calls):
        testing.run_on_meta(size, unet=unet)
    with NormRecorder("vae", calls):
        testing.run_on_meta(size, vae=vae)
    return collections.Counter(tuple(c) for c in calls)


def time_shape(shape, groups: int, silu: bool, dtype: torch.dtype, repeats: int) -> dict:
    """Median ms of each way, interleaved, and each way's error against float64."""
    C = shape[1]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(C) + 1).to(dtype), torch.randn(C).to(dtype)
    ways = {"torch": lambda: ops.group_norm_ref(x, groups, w, b, 1e-5, silu), "kernel": lambda: group_norm_cpu.group_norm(x, groups, w, b, 1e-5, silu)}
    outs = {way: f() for way, f in ways.items()}  # warm-up
    medians = testing.interleaved_medians(ways, repeats)
    ref = ops.group_norm_ref(x.double(), groups, w.double(), b.double(), 1e-5, silu)
    errors = {f"{way} error": ((out.double() - ref).abs().max() / ref.abs().max()).item() for way, out in outs.items()}
    return {**medians, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if group_norm_cpu.library() is None:
        raise SystemExit("the GroupNorm kernel is unavailable on this CPU (fastdiff.kernels.group_norm_cpu.library)")
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the CPU torch backend runs
    dtype = getattr(torch, args.dtype)
    print(f"{testing.cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.size}px, channels-last")
    print(f"{'network':7s} {'input':22s} {'silu':>4s} {'calls':>5s} {'torch ms':>9s} {'kernel ms':>9s} {'ratio':>6s} {'torch err':>9s} {'kernel err':>10s}")
    rows, totals = [], collections.Counter()
    with torch.no_grad():
        for (net, shape, groups, silu), calls in sorted(norm_shapes(args.size).items()):
            r = time_shape(shape, groups, silu, dtype, args.repeats)
            rows.append({"network": net, "input": list(shape), "groups": groups, "silu": silu, "calls": calls, **r})
            totals[(net, "torch")] += calls * r["torch"]
            totals[(net, "kernel")] += calls * r["kernel"]
            print(f"{net:7s} {str(list(shape)):22s} {'yes' if silu else 'no':>4s} {calls:5d} {r['torch']:9.2f} {r['kernel']:9.2f} "
                  f"{r['torch'] / r['kernel']:5.2f}x {r['torch error']:9.1e} {r['kernel error']:10.1e}", flush=True)
    for net in ("unet", "vae"):
        print(f"{net} total per forward: {totals[(net, 'torch')]:.1f} ms torch, {totals[(net, 'kernel')]:.1f} ms kernel")
    if args.json:
        args.json.write_text(json.dumps({"cpu": testing.cpu_name(), "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
