"""bf16 linears at SD1.5's shapes on the CPU: oneDNN's packed weight in the layout it picks for the
call's token count, against the layout it picks for one token (blocks of 64 output columns
instead of 32), and what `fastdiff.ops.linear_layout` chooses when it times the two itself.

    python benchmarks/linear_layout_cpu.py                 # 256x256 images: UNet (CFG batch 2) and VAE
    python benchmarks/linear_layout_cpu.py --size 512 --json layout.json

Shapes come from running SD1.5 on the meta device with torch's ops, recording each F.linear call
as the packed path runs it: linears of one input (q, k, v; the resnets' time projections) as one
matmul of their summed width, a GEGLU projection (N = 8 K) as its two halves. (The text's k and v,
computed once per prompt there, count here at every forward.) A row is the
time per call with a warm weight, the two layouts interleaved after a warm-up, median of
`--repeats` rounds; "speed-up" is the median of the rounds' ratios. "rule" is the layout
`ops.linear_layout` picked for a fresh weight of the shape (from its own, shorter timing). The
error column is the larger of the two layouts' largest differences from float64, relative to the
output's largest value. Random inputs and weights.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fastdiff import allocator, ops, precision, testing


class Recorder(TorchFunctionMode):
    """Records each matmul the packed path runs as (network, tokens, K, N): F.linear calls in a
    row on one input as one (`ops.linear_split`: q, k, v; the time projections), a GEGLU
    projection (N = 8 K) as its two halves."""

    def __init__(self, calls: list, network: str):
        super().__init__()
        self.calls, self.network, self.last_input = calls, network, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, w = args[0], args[1]
            tokens, k, n = x.numel() // x.shape[-1], w.shape[1], w.shape[0]
            if x is self.last_input:  # the same input as the call before: one joint matmul
                net, tokens, k, joint = self.calls.pop()
                self.calls.append((net, tokens, k, joint + n))
            else:
                halves = 2 if n == 8 * k else 1  # GEGLU: the packed path runs the gate and value halves apart
                self.calls.extend([(self.network, tokens, k, n // halves)] * halves)
            self.last_input = x
        else:
            self.last_input = None
        return func(*args, **(kwargs or {}))


def shapes(size: int) -> collections.Counter:
    """(network, tokens, K, N) -> calls in one UNet forward (CFG batch 2) and one VAE decode."""
    calls: list = []
    unet, vae = testing.sd15_on_meta()
    with Recorder(calls, "unet"):
        testing.run_on_meta(size, unet=unet)
    with Recorder(calls, "vae"):
        testing.run_on_meta(size, vae=vae)
    return collections.Counter(calls)


def time_shape(tokens: int, k: int, n: int, repeats: int) -> dict:
    """Median ms per call in each layout, the median ratio, the rule's pick, and the error."""
    x = torch.randn(tokens, k).bfloat16()
    w, b = (torch.randn(n, k) / k**0.5).bfloat16(), torch.randn(n).bfloat16()
    packs = {"own": torch.ops.mkldnn._reorder_linear_weight(w, tokens), "one-token": torch.ops.mkldnn._reorder_linear_weight(w, 1)}
    ways = {name: (lambda p=p: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")) for name, p in packs.items()}
    outs = {name: f() for name, f in ways.items()}  # warm-up: oneDNN builds each primitive
    rounds = [testing.interleaved_medians(ways, 3) for _ in range(repeats)]
    ref = F.linear(x.double(), w.double(), b.double())
    error = max(((out.double() - ref).abs().max() / ref.abs().max()).item() for out in outs.values())
    ops.LINEAR_LAYOUT.clear()  # the rule times this shape afresh
    pick = ops.linear_layout(x, w.clone(), b)
    return {
        "own ms": statistics.median(r["own"] for r in rounds),
        "one-token ms": statistics.median(r["one-token"] for r in rounds),
        "speed-up": statistics.median(r["own"] / r["one-token"] for r in rounds),
        "rule": "one-token" if pick == 1 and tokens > 1 else "own",
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (ops.PACKED_LINEAR and precision.cpu_runs_fast(torch.bfloat16)):
        raise SystemExit("no packed bf16 linears on this CPU (they need oneDNN and AVX-512-BF16 or AMX)")
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    env = testing.environment(torch.device("cpu"))
    print(f"SD1.5 {args.size}x{args.size}, bf16 linears, {args.threads} threads, {env.get('cpu', '?')}")
    print(f"{'net':4s} {'tokens':>6s} {'K':>5s} {'N':>5s} {'calls':>5s} {'own ms':>8s} {'1-tok ms':>8s} {'speed-up':>8s} {'rule':>9s} {'error':>8s}")
    rows, totals = [], collections.Counter()
    with torch.no_grad():
        for (net, tokens, k, n), calls in sorted(shapes(args.size).items()):
            r = time_shape(tokens, k, n, args.repeats)
            print(f"{net:4s} {tokens:6d} {k:5d} {n:5d} {calls:5d} {r['own ms']:8.3f} {r['one-token ms']:8.3f} "
                  f"{r['speed-up']:7.2f}x {r['rule']:>9s} {r['error']:8.1e}")  # fmt: skip
            for way in ("own", "one-token"):
                totals[f"{net} {way}"] += calls * r[f"{way} ms"]
            totals[f"{net} rule"] += calls * r[f"{r['rule']} ms"]
            rows.append({"network": net, "tokens": tokens, "K": k, "N": n, "calls": calls, **r})
    for net in ("unet", "vae"):
        own, rule = totals[f"{net} own"], totals[f"{net} rule"]
        print(f"{net} per forward: own layouts {own:.1f} ms, one-token everywhere {totals[f'{net} one-token']:.1f} ms, "
              f"by the rule {rule:.1f} ms ({own / rule:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "size": args.size, "rows": rows, "totals": dict(totals)}, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
