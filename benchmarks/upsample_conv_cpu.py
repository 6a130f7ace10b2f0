"""CPU upsamplers at SD1.5's shapes: nearest 2x upsampling then the (packed) 3x3 convolution, as
the module is written, against one transposed convolution on a packed 4x4 kernel
(`fastdiff.ops.PACKED_CONV_TRANSPOSE`), side by side per shape; "rule" is the way "auto" mode
runs (`ops.upsample_conv_path`: as written where the convolution takes the few-rows kernel).

    python benchmarks/upsample_conv_cpu.py                        # 512x512 images, fp32
    python benchmarks/upsample_conv_cpu.py --dtype bfloat16 --size 256 --json up.json

Shapes come from running SD1.5's UNet (CFG batch 2) and VAE decoder (batch 1) on the meta device.
The process's allocator is set as a CPU torch backend sets it (fastdiff.allocator).
Each shape is timed interleaved (as written, transposed, ...) after a warm-up call each, median of
`--repeats`; totals weigh each shape by its calls per forward. Random weights.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch

from fastdiff import allocator, ops, sd15, testing
from fastdiff.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from fastdiff.models.common import Upsample2D


def upsampler_shapes(size: int) -> collections.Counter:
    """(network, input shape) -> calls in one forward (UNet) or decode (VAE)."""
    shapes: collections.Counter = collections.Counter()
    latent = size // 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNetConfig.from_dict(sd15.SD15_UNET)).eval()
        vae = AutoencoderKL(VAEConfig.from_dict(sd15.SD15_VAE)).eval()
    for name, net in (("unet", unet), ("vae", vae)):
        for mod in net.modules():
            if isinstance(mod, Upsample2D):
                mod.register_forward_pre_hook(lambda m, args, name=name: shapes.update([(name, tuple(args[0].shape))]))
    with torch.no_grad(), ops.kernels("torch"), torch.device("meta"):
        unet(torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768))
        vae.decode(torch.randn(1, 4, latent, latent))
    return shapes


def time_shape(shape, repeats: int, dtype: torch.dtype) -> dict:
    """Median ms of each way, interleaved, and the ways' largest difference relative to the output."""
    channels = shape[1]
    x = torch.randn(shape).to(dtype)
    w = (torch.randn(channels, channels, 3, 3) / (9 * channels) ** 0.5).to(dtype)
    b = torch.randn(channels).to(dtype)
    ways = {"as written": lambda: ops.upsample_conv_ref(x, w, b), "transposed": lambda: ops.upsample_conv_transposed(x, w, b)}
    with torch.no_grad(), ops.kernels("auto"):
        rule = ops.upsample_conv_path(x, w)
        outs = {way: f() for way, f in ways.items()}  # warm-up: packs the weights
        medians = testing.interleaved_medians(ways, repeats)
    diff = (outs["transposed"].double() - outs["as written"].double()).abs().max() / outs["as written"].double().abs().max()
    return {**medians, "relative difference": diff.item(), "rule": "as written" if rule == "reference" else rule}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not ops.PACKED_CONV_TRANSPOSE:
        raise SystemExit("this torch has no oneDNN transposed convolution on packed weights (ops.PACKED_CONV_TRANSPOSE)")
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the CPU torch backend runs
    dtype = getattr(torch, args.dtype)
    print(f"{testing.cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, {args.size}px")
    print(f"{'network':8s} {'input':22s} {'calls':>5s} {'as written ms':>14s} {'transposed ms':>14s} {'ratio':>6s} {'rel. diff':>9s} {'rule':>10s}")
    rows, totals = [], collections.Counter()
    for (net, shape), calls in sorted(upsampler_shapes(args.size).items()):
        r = time_shape(shape, args.repeats, dtype)
        rows.append({"network": net, "input": list(shape), "calls": calls, **r})
        totals[(net, "as written")] += calls * r["as written"]
        totals[(net, "transposed")] += calls * r["transposed"]
        totals[(net, "rule")] += calls * r[r["rule"]]
        print(f"{net:8s} {str(list(shape)):22s} {calls:5d} {r['as written']:14.1f} {r['transposed']:14.1f} "
              f"{r['as written'] / r['transposed']:5.2f}x {r['relative difference']:9.1e} {r['rule']:>10s}", flush=True)
    for net in ("unet", "vae"):
        print(f"{net} total per forward: {totals[(net, 'as written')]:.1f} ms as written, {totals[(net, 'transposed')]:.1f} ms transposed, "
              f"{totals[(net, 'rule')]:.1f} ms by ops.upsample_conv_path")
    if args.json:
        args.json.write_text(json.dumps({"cpu": testing.cpu_name(), "torch": torch.__version__, "size": args.size, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
