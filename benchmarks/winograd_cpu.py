"""bf16 3x3 convolutions at SD1.5's shapes: oneDNN on a packed weight (direct) against Winograd
F(2x2, 3x3) (`fastdiff.kernels.winograd_cpu`), speed and error against float64 per shape, and
which one `fastdiff.ops.conv2d` runs.

    python benchmarks/winograd_cpu.py                          # UNet, 256 px, CFG batch 2
    python benchmarks/winograd_cpu.py --network vae --size 512 --repeats 3 --json wg.json

For a CPU with AVX512-BF16 and no AMX (where the kernel runs). Each shape is timed interleaved
(direct, winograd, direct, ...), median of `--repeats`, channels-last bf16 input as the packed
convolutions hand it on, random weights scaled to unit output variance, bias and no residual;
the error is the relative RMS against the same convolution in float64 of the same bf16 values.
Totals weigh each shape by its calls in one forward; `MIN_PIXELS` and `MIN_MULTIPLY_ADDS` in the
kernel module are the thresholds this checks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import allocator, ops, testing
from fastdiff.kernels import winograd_cpu as kernel


def time_shape(shape, out_channels: int, repeats: int) -> dict:
    """Median ms of each way and its error against float64."""
    x = torch.randn(shape).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(out_channels, shape[1], 3, 3) / (9 * shape[1]) ** 0.5).bfloat16()
    b = torch.randn(out_channels) * 0.1
    with torch.no_grad():
        packed = ops.packed_weight(w, (1, 1), (1, 1), x.shape)
        transformed = ops.winograd_weights(w, x)
    ways = {
        "direct": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b.bfloat16(), [1, 1], [1, 1], [1, 1], 1, "none", [], ""),
        "winograd": lambda: kernel.conv2d(x, transformed, b, out_channels),
    }
    ref = F.conv2d(x.double(), w.double(), b.bfloat16().double(), padding=1)
    errors = {f"{name} error": testing.relative_rms(way(), ref) for name, way in ways.items()}
    medians = testing.interleaved_medians(ways, repeats)
    with ops.kernels("auto"), torch.no_grad():
        path = ops.conv_path(x, w, (1, 1), (1, 1))
    return {**medians, **errors, "rule": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--network", choices=("unet", "vae"), default="unet")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with CFG)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if kernel.library() is None:
        raise SystemExit("the Winograd kernel does not run on this CPU (it needs AVX512-BF16 and no AMX)")
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as a CPU torch backend runs
    torch.manual_seed(0)

    rows = []
    cpu = testing.environment(torch.device("cpu")).get("cpu", "cpu")
    print(f"SD1.5 {args.network} 3x3 convolutions, {args.size}x{args.size}, bfloat16, {torch.get_num_threads()} threads, {cpu}")
    print(f"{'input':>22} {'out':>5} {'calls':>5} {'direct ms':>10} {'wino ms':>10} {'speed-up':>9} {'direct err':>11} {'wino err':>9}  rule")
    shapes = testing.conv_shapes(args.size, args.network, args.batch)
    for (shape, out_ch, k, stride, padding), calls in sorted(shapes.items()):
        if not (k == 3 and stride == (1, 1) and padding == (1, 1) and shape[1] % 16 == 0 and out_ch % 16 == 0):
            continue
        t = time_shape(shape, out_ch, args.repeats)
        rows.append({"shape": shape, "out_channels": out_ch, "calls": calls, **t})
        print(
            f"{str(shape):>22} {out_ch:>5} {calls:>5} {t['direct']:>10.2f} {t['winograd']:>10.2f} {t['direct'] / t['winograd']:>8.2f}x"
            f" {t['direct error']:>11.1e} {t['winograd error']:>9.1e}  {t['rule']}", flush=True,
        )
    direct = sum(r["calls"] * r["direct"] for r in rows)
    wino = sum(r["calls"] * r["winograd"] for r in rows)
    rule = sum(r["calls"] * (r["winograd"] if r["rule"] == "winograd" else r["direct"]) for r in rows)
    print(f"per forward: direct everywhere {direct:.0f} ms, winograd everywhere {wino:.0f} ms, the rule {rule:.0f} ms ({direct / rule:.2f}x)")
    if args.json:
        summary = {"network": args.network, "size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
                   "environment": testing.environment(torch.device("cpu")), "rows": rows,
                   "total_ms": {"direct": direct, "winograd": wino, "rule": rule}}  # fmt: skip
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
