"""CPU convolutions at SD1.5's UNet shapes: oneDNN (F.conv2d), oneDNN on a packed weight
(`fastdiff.ops.PACKED_CONV`) and im2col + one GEMM (ATen's thnn_conv2d), side by side per shape,
and what `fastdiff.ops.conv2d`'s rule picks.

    python benchmarks/conv_cpu.py                 # 256x256 images (32x32 latents), CFG batch 2
    python benchmarks/conv_cpu.py --size 512 --repeats 3 --json conv.json
    python benchmarks/conv_cpu.py --dtype bfloat16    # on a CPU with bf16 instructions (AMX)

The rule (`ops.SMALL_CONV_PIXELS`) is a fixed threshold, not a per-call timing, so results do not
depend on a noisy first-call measurement; this script is how to check it on another CPU. Each
shape is timed interleaved (oneDNN, im2col, oneDNN, ...), median of `--repeats`; totals weigh each
shape by how often one UNet forward calls it. Random weights; "packed nhwc" is the packed way on
channels-last activations (what a channels-last model would feed it); GFLOP/s is the best way's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import ops, testing


WAYS = ("onednn", "packed", "packed nhwc", "im2col")


def time_shape(shape, out_channels, kernel, stride, padding, repeats: int, dtype: torch.dtype) -> dict:
    """Median ms of each way, interleaved, after one warm-up call each."""
    x = torch.randn(shape).to(dtype)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(out_channels, shape[1], kernel, kernel) / (shape[1] * kernel * kernel) ** 0.5).to(dtype)
    b = torch.randn(out_channels).to(dtype)
    with torch.no_grad():
        packed = ops.packed_weight(w, tuple(stride), tuple(padding), x.shape)
    args = (list(padding), list(stride), [1, 1], 1, "none", [], "")
    ways = {
        "onednn": lambda: F.conv2d(x, w, b, stride, padding),
        "packed": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, *args),
        "packed nhwc": lambda: torch.ops.mkldnn._convolution_pointwise(x_nhwc, packed, b, *args),
        "im2col": lambda: torch.ops.aten.thnn_conv2d(x, w, (kernel, kernel), b, stride, padding),
    }
    ref = ways["onednn"]().float()
    diff = max((ways[n]().float() - ref).abs().max().item() for n in WAYS[1:])
    medians = testing.interleaved_medians(ways, repeats)
    with ops.kernels("auto"), torch.no_grad():
        rule = {"reference": "onednn"}.get(path := ops.conv_path(x, w, stride, padding), path)
    return {**medians, "rule": rule, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    print(f"SD1.5 UNet convolutions, {args.size}x{args.size}, batch {args.batch}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'input':>22} {'out':>5} {'k':>2} {'s':>2} {'calls':>5}" + "".join(f" {w + ' ms':>14}" for w in WAYS) + f" {'GFLOP/s':>8}  rule")
    for (shape, out_ch, k, stride, padding), calls in sorted(testing.conv_shapes(args.size, "unet", args.batch).items()):
        t = time_shape(shape, out_ch, k, stride, padding, args.repeats, dtype)
        out_pixels = ((shape[2] + 2 * padding[0] - k) // stride[0] + 1) * ((shape[3] + 2 * padding[1] - k) // stride[1] + 1)
        flops = 2 * shape[0] * out_pixels * out_ch * shape[1] * k * k
        rows.append({"shape": shape, "out_channels": out_ch, "kernel": k, "stride": stride, "calls": calls, "flops": flops, **t})
        faster = min(WAYS, key=lambda n: t[n])
        mark = "" if t["rule"] == faster else f"  ({faster} was faster)"
        print(
            f"{str(shape):>22} {out_ch:>5} {k:>2} {stride[0]:>2} {calls:>5}" + "".join(f" {t[w]:>14.2f}" for w in WAYS)
            + f" {flops / t[faster] / 1e6:>8.0f}  {t['rule']}{mark}"
        )
    total = {way: sum(r["calls"] * r[way] for r in rows) for way in WAYS}
    rule = sum(r["calls"] * r[r["rule"]] for r in rows)
    best = sum(r["calls"] * min(r[w] for w in WAYS) for r in rows)
    print(
        "per UNet forward: " + ", ".join(f"{w} everywhere {total[w]:.0f} ms" for w in WAYS)
        + f"; the rule {rule:.0f} ms ({total['onednn'] / rule:.2f}x oneDNN), the fastest of each {best:.0f} ms; "
        f"max |difference to oneDNN| {max(r['max_abs_diff'] for r in rows):.1e}"
    )
    if args.json:
        summary = {"size": args.size, "batch": args.batch, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows,
                   "total_ms": {**total, "rule": rule, "best": best}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
