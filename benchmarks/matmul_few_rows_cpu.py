"""bf16 convolutions and linears with few output rows at SD1.5's UNet shapes (CFG batch 2): oneDNN
on packed weights (what "auto" mode ran before) against fastdiff's AMX kernel
(`fastdiff.kernels.matmul_few_rows_cpu`), side by side, with weights cold as in a forward pass.

    python benchmarks/matmul_few_rows_cpu.py                 # 256x256 images
    python benchmarks/matmul_few_rows_cpu.py --size 512 --json few.json

Shapes come from running SD1.5's UNet on the meta device with torch's ops, recording each
F.conv2d and F.linear call with at most 512 output rows (so the table shows where the kernel's
rule stops; linears run in the kernel as 1x1 convolutions here, and stay with oneDNN in the runtime). A UNet forward reads 1.7 GB of weights once, more than the caches hold, so each way
cycles through copies of the weight totalling about 1 GB per call round; a row is the time per
call, interleaved after a warm-up round, median of `--repeats`. "GB/s" is weight bytes per second.
The error columns are each way's largest difference from float64, relative to the output's
largest value. Random inputs and weights.
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
from fastdiff.kernels import matmul_few_rows_cpu as kernel

MAX_ROWS = 512


class Recorder(TorchFunctionMode):
    """Records each F.conv2d / F.linear call's (kind, input shape, weight shape, stride, padding)."""

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.conv2d:
            x, w = args[0], args[1]
            stride, padding = tuple(args[3]), tuple(args[4])
            if out.shape[0] * out.shape[2] * out.shape[3] <= MAX_ROWS:
                self.calls.append(("conv", tuple(x.shape), tuple(w.shape), stride, padding))
        elif func is F.linear:
            x, w = args[0], args[1]
            if x.numel() // x.shape[-1] <= MAX_ROWS:
                self.calls.append(("linear", tuple(x.shape), tuple(w.shape), None, None))
        return out


def shapes(size: int) -> collections.Counter:
    """(kind, input shape, weight shape, stride, padding) -> calls in one UNet forward."""
    calls: list = []
    unet, _ = testing.sd15_on_meta()
    with Recorder(calls):
        testing.run_on_meta(size, unet=unet)
    return collections.Counter(calls)


def time_shape(kind, x_shape, w_shape, stride, padding, repeats: int) -> dict:
    """Median ms per call of each way, weights cold, and each way's error against float64."""
    copies = max(2, int(1e9 // (2 * torch.Size(w_shape).numel())))
    weights = [(torch.randn(w_shape) / (torch.Size(w_shape[1:]).numel() ** 0.5)).bfloat16() for _ in range(copies)]
    bias = torch.randn(w_shape[0]).bfloat16()
    x = torch.randn(x_shape).bfloat16()
    n = w_shape[0]
    if kind == "conv":
        x = x.contiguous(memory_format=torch.channels_last)  # as the convolutions before it leave it
        onednn = [ops.packed_weight(w, stride, padding, x.shape) for w in weights]
        args = (list(padding), list(stride), [1, 1], 1)

        def dnn(i):
            return torch.ops.mkldnn._convolution_pointwise(x, onednn[i], bias, *args, "none", [], "")

        def ours(i):
            return kernel.conv2d(x, packed[i], bias.float(), n, w_shape[-1], stride[0], padding[0])

        def reference():
            return F.conv2d(x.double(), weights[0].double(), bias.double(), stride, padding)
    else:
        x2 = x.reshape(-1, x.shape[-1])  # [rows, K]
        onednn = [torch.ops.mkldnn._reorder_linear_weight(w, x2.shape[0]) for w in weights]

        def dnn(i):
            return torch.ops.mkldnn._linear_pointwise(x2, onednn[i], bias, "none", [], "")

        x4 = x2[:, :, None, None]  # rows as 1x1 images: the kernel's linear

        def ours(i):
            return kernel.conv2d(x4, packed[i], bias.float(), n, 1, 1, 0)

        def reference():
            return F.linear(x2.double(), weights[0].double(), bias.double())

    packed = [kernel.pack(w if w.dim() == 4 else w[:, :, None, None]) for w in weights]
    ways = {"oneDNN": lambda: [dnn(i) for i in range(copies)], "kernel": lambda: [ours(i) for i in range(copies)]}
    outs = {way: f()[0] for way, f in ways.items()}  # warm-up
    medians = {way: ms / copies for way, ms in testing.interleaved_medians(ways, repeats).items()}
    ref = reference()
    errors = {f"{way} error": ((out.double().reshape(ref.shape) - ref).abs().max() / ref.abs().max()).item() for way, out in outs.items()}
    return {**medians, **errors, "weight MB": 2 * torch.Size(w_shape).numel() / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if kernel.library() is None:
        raise SystemExit("the kernel does not run on this machine (no AMX-BF16, or it could not be built: see the log)")
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    env = testing.environment(torch.device("cpu"))
    print(f"SD1.5 UNet {args.size}x{args.size}, CFG batch 2, bf16, {args.threads} threads, {env.get('cpu', '?')}")
    print(f"{'kind':6s} {'input':>20s} {'weight':>22s} {'str':>3s} {'calls':>5s} {'MB':>6s} {'oneDNN ms':>10s} {'GB/s':>5s} "
          f"{'kernel ms':>10s} {'GB/s':>5s} {'speed-up':>8s} {'rule':>6s} {'err dnn':>8s} {'err ours':>8s}")  # fmt: skip
    rows, totals = [], collections.Counter()
    with torch.no_grad():
        for (kind, xs, ws, stride, padding), calls in sorted(shapes(args.size).items(), key=lambda kv: kv[0][1]):
            r = time_shape(kind, xs, ws, stride, padding, args.repeats)
            xt, wt = torch.empty(xs, device="meta", dtype=torch.bfloat16), torch.empty(ws, device="meta", dtype=torch.bfloat16)
            rule = kind == "conv" and kernel.pays_conv(xt, wt, stride, padding)  # linears: always oneDNN
            mb = r["weight MB"]
            print(f"{kind:6s} {str(xs):>20s} {str(ws):>22s} {stride[0] if stride else '':>3} {calls:5d} {mb:6.1f} "
                  f"{r['oneDNN']:10.3f} {mb / r['oneDNN']:5.1f} {r['kernel']:10.3f} {mb / r['kernel']:5.1f} "
                  f"{r['oneDNN'] / r['kernel']:7.2f}x {'kernel' if rule else 'oneDNN':>6s} {r['oneDNN error']:8.1e} {r['kernel error']:8.1e}")  # fmt: skip
            totals["oneDNN"] += calls * r["oneDNN"]
            totals["kernel"] += calls * r["kernel"]
            totals["rule"] += calls * (r["kernel"] if rule else r["oneDNN"])
            rows.append({"kind": kind, "input": xs, "weight": ws, "stride": stride, "padding": padding, "calls": calls, "rule": rule, **r})
    print(f"per forward: oneDNN {totals['oneDNN']:.1f} ms, kernel everywhere {totals['kernel']:.1f} ms, "
          f"by the rule {totals['rule']:.1f} ms ({totals['oneDNN'] / totals['rule']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "size": args.size, "rows": rows, "totals": dict(totals)}, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
