"""CPU attention at SD1.5's shapes: torch's SDPA (CPU flash attention) against fastdiff's AMX
kernel (`fastdiff.kernels.attention_cpu`, what "auto" mode runs for bf16 on an AMX CPU), side by
side per shape, each on the models' own strided views of [B, tokens, heads * d].

    python benchmarks/attention_cpu.py                  # 512x512 images
    python benchmarks/attention_cpu.py --size 256 --json attn.json

Shapes come from running SD1.5's UNet (CFG batch 2) and VAE decoder (batch 1) on the meta device.
Each shape is timed interleaved (SDPA, kernel, ...) after a warm-up call each, median of
`--repeats`, with the reshape to [B, tokens, heads * d] the models apply next (free on the
kernel's output, a copy on SDPA's); totals weigh each shape by its calls per forward. The error
column is each way's largest difference from SDPA in float64, relative to the output's largest
value. Random inputs (unit normal q, k, v).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff import allocator, testing
from fastdiff.kernels import attention_cpu
from fastdiff.models.unet import Attention
from fastdiff.models.vae import VAEAttention


def attention_shapes(size: int) -> collections.Counter:
    """(network, batch, heads, queries, keys, head dim) -> calls in one forward (UNet) or decode (VAE)."""
    shapes: collections.Counter = collections.Counter()
    unet, vae = testing.sd15_on_meta()

    def unet_hook(m, args, kwargs):
        x = args[0]
        context = kwargs.get("context", args[1] if len(args) > 1 else None)
        keys = x.shape[1] if context is None else context.shape[1]
        shapes.update([("unet", x.shape[0], m.heads, x.shape[1], keys, m.head_dim)])

    def vae_hook(m, args):
        B, C, H, W = args[0].shape
        shapes.update([("vae", B, 1, H * W, H * W, C)])

    for mod in unet.modules():
        if isinstance(mod, Attention):
            mod.register_forward_pre_hook(unet_hook, with_kwargs=True)
    for mod in vae.modules():
        if isinstance(mod, VAEAttention):
            mod.register_forward_pre_hook(vae_hook)
    testing.run_on_meta(size, unet, vae)
    return shapes


def time_shape(batch: int, heads: int, queries: int, keys: int, d: int, repeats: int) -> dict:
    """Median ms of each way, interleaved, and each way's error against float64."""
    def views(tokens):  # [B, heads, tokens, d] views of [B, tokens, heads * d], as the models make them
        return torch.randn(batch, tokens, heads * d, dtype=torch.bfloat16).view(batch, tokens, heads, d).transpose(1, 2)

    q, k, v = views(queries), views(keys), views(keys)
    scale = d**-0.5
    merge = lambda o: o.transpose(1, 2).reshape(batch, queries, heads * d)  # noqa: E731
    ways = {"sdpa": lambda: merge(F.scaled_dot_product_attention(q, k, v, scale=scale)), "kernel": lambda: merge(attention_cpu.attention(q, k, v, scale))}
    outs = {way: f() for way, f in ways.items()}  # warm-up
    medians = testing.interleaved_medians(ways, repeats)
    ref = merge(F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale))
    errors = {f"{way} error": ((out.double() - ref).abs().max() / ref.abs().max()).item() for way, out in outs.items()}
    return {**medians, **errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if attention_cpu.library() is None:
        raise SystemExit("the attention kernel is unavailable on this CPU (fastdiff.kernels.attention_cpu.library)")
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()  # as the CPU torch backend runs
    print(f"{testing.cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, bfloat16, {args.size}px")
    print(f"{'network':7s} {'B x heads':>9s} {'queries':>7s} {'keys':>5s} {'d':>4s} {'calls':>5s} {'sdpa ms':>8s} {'ours ms':>7s} "
          f"{'ratio':>6s} {'sdpa err':>9s} {'ours err':>8s}")
    rows, totals = [], collections.Counter()
    with torch.no_grad():
        for (net, batch, heads, queries, keys, d), calls in sorted(attention_shapes(args.size).items()):
            r = time_shape(batch, heads, queries, keys, d, args.repeats)
            rows.append({"network": net, "batch": batch, "heads": heads, "queries": queries, "keys": keys, "head_dim": d, "calls": calls, **r})
            totals[(net, "sdpa")] += calls * r["sdpa"]
            totals[(net, "kernel")] += calls * r["kernel"]
            print(f"{net:7s} {f'{batch}x{heads}':>9s} {queries:7d} {keys:5d} {d:4d} {calls:5d} {r['sdpa']:8.2f} {r['kernel']:7.2f} "
                  f"{r['sdpa'] / r['kernel']:5.2f}x {r['sdpa error']:9.1e} {r['kernel error']:8.1e}", flush=True)
    for net in ("unet", "vae"):
        print(f"{net} total per forward: {totals[(net, 'sdpa')]:.1f} ms SDPA, {totals[(net, 'kernel')]:.1f} ms the kernel ({'AMX' if attention_cpu.cpu_has_amx() else 'AVX512-BF16'})")
    if args.json:
        args.json.write_text(json.dumps({"cpu": testing.cpu_name(), "torch": torch.__version__, "size": args.size, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
