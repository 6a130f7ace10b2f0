"""Linears at SD1.5's shapes on the CPU, per matmul shape, and what `fastdiff.ops` picks there.

bf16 (`--dtype bf16`, the default; needs bf16 instructions): oneDNN's packed weight in the layout
it picks for the call's token count, against the layout it picks for one token (blocks of 64
output columns instead of 32), and what `ops.linear_layout` chooses when it times the two itself.
fp32 (`--dtype fp32`): F.linear (MKL's GEMM on the plain weight) against oneDNN on a packed weight
in its own layout, and what `ops.fp32_packing_pays` chooses when it times the two itself.

    python benchmarks/linear_layout_cpu.py                 # 256x256 images: UNet (CFG batch 2) and VAE
    python benchmarks/linear_layout_cpu.py --size 512 --json layout.json
    python benchmarks/linear_layout_cpu.py --dtype fp32    # also the text encoder (CFG: 2 x 77 tokens)

Shapes come from running SD1.5 on the meta device with torch's ops, recording each F.linear call
as the packed path runs it: linears of one input (q, k, v; the resnets' time projections) as one
matmul of their summed width; a GEGLU projection (N = 8 K) in bf16 as its two halves, in fp32 at
its whole width, as the fp32 rule times it. (The text's k and v, computed once per prompt there,
count here at every forward.) A row is the time per call with a warm weight, the two ways
interleaved after a warm-up, median of `--repeats` rounds; "speed-up" is the median of the rounds'
ratios (first way / second). "rule" is the way `fastdiff.ops` picked for a fresh weight of the
shape (from its own, shorter timing). The error column is the larger of the two ways' largest
differences from float64, relative to the output's largest value. Random inputs and weights.
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

from fastdiff import allocator, ops, precision, sd15, testing
from fastdiff.models.clip import CLIPTextConfig, CLIPTextModel


class Recorder(TorchFunctionMode):
    """Records each matmul the packed path runs as (network, tokens, K, N): F.linear calls in a
    row on one input as one (`ops.linear_split`: q, k, v; the time projections), a GEGLU
    projection (N = 8 K) as its two halves where `split_geglu` (bf16's packed path)."""

    def __init__(self, calls: list, network: str, split_geglu: bool = True):
        super().__init__()
        self.calls, self.network, self.last_input, self.split_geglu = calls, network, None, split_geglu

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            x, w = args[0], args[1]
            tokens, k, n = x.numel() // x.shape[-1], w.shape[1], w.shape[0]
            if x is self.last_input:  # the same input as the call before: one joint matmul
                net, tokens, k, joint = self.calls.pop()
                self.calls.append((net, tokens, k, joint + n))
            else:
                halves = 2 if n == 8 * k and self.split_geglu else 1  # GEGLU: the packed path runs the gate and value halves apart
                self.calls.extend([(self.network, tokens, k, n // halves)] * halves)
            self.last_input = x
        else:
            self.last_input = None
        return func(*args, **(kwargs or {}))


def shapes(size: int, dtype: torch.dtype) -> collections.Counter:
    """(network, tokens, K, N) -> calls in one UNet forward (CFG batch 2) and one VAE decode, and
    in fp32 one text encoding (CFG: 2 prompts)."""
    calls: list = []
    split = dtype == torch.bfloat16
    unet, vae = testing.sd15_on_meta()
    with Recorder(calls, "unet", split):
        testing.run_on_meta(size, unet=unet)
    with Recorder(calls, "vae", split):
        testing.run_on_meta(size, vae=vae)
    if dtype == torch.float32:  # bf16 picks the text encoder's dtype by its own rule (fastdiff.precision)
        with torch.device("meta"):
            text = CLIPTextModel(CLIPTextConfig.from_dict(sd15.SD15_TEXT_ENCODER)).eval()
        with Recorder(calls, "text", split), torch.no_grad(), ops.kernels("torch"), torch.device("meta"):
            text(torch.zeros(2, 77, dtype=torch.int64))
    return collections.Counter(calls)


def time_shape(tokens: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> dict:
    """Median ms per call each way, the median ratio, the rule's pick, and the error."""
    x = torch.randn(tokens, k).to(dtype)
    w, b = (torch.randn(n, k) / k**0.5).to(dtype), torch.randn(n).to(dtype)
    pack = torch.ops.mkldnn._reorder_linear_weight
    if dtype == torch.bfloat16:
        packs = {"own": pack(w, tokens), "one-token": pack(w, 1)}
        ways = {name: (lambda p=p: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")) for name, p in packs.items()}
    else:
        packed = pack(w, tokens)
        ways = {"F.linear": lambda: F.linear(x, w, b), "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")}
    outs = {name: f() for name, f in ways.items()}  # warm-up: oneDNN builds each primitive
    rounds = [testing.interleaved_medians(ways, 3) for _ in range(repeats)]
    ref = F.linear(x.double(), w.double(), b.double())
    error = max(((out.double() - ref).abs().max() / ref.abs().max()).item() for out in outs.values())
    if dtype == torch.bfloat16:
        ops.LINEAR_LAYOUT.clear()  # the rule times this shape afresh
        rule = "one-token" if ops.linear_layout(x, w.clone(), b) == 1 and tokens > 1 else "own"
    else:
        ops.FP32_PACKED.clear()
        rule = "packed" if ops.fp32_packing_pays(tokens, k, n) else "F.linear"
    first, second = ways
    return {
        **{f"{name} ms": statistics.median(r[name] for r in rounds) for name in ways},
        "speed-up": statistics.median(r[first] / r[second] for r in rounds),
        "rule": rule,
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are 1/8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if not ops.PACKED_LINEAR:
        raise SystemExit("no packed linears in this torch (they need oneDNN's _linear_pointwise)")
    if dtype == torch.bfloat16 and not precision.cpu_runs_fast(torch.bfloat16):
        raise SystemExit("no packed bf16 linears on this CPU (they need AVX-512-BF16 or AMX): try --dtype fp32")
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    env = testing.environment(torch.device("cpu"))
    names = ("own", "one-token") if dtype == torch.bfloat16 else ("F.linear", "packed")
    print(f"SD1.5 {args.size}x{args.size}, {args.dtype} linears, {args.threads} threads, {env.get('cpu', '?')}")
    print(f"{'net':4s} {'tokens':>6s} {'K':>5s} {'N':>5s} {'calls':>5s} {names[0] + ' ms':>11s} {names[1] + ' ms':>12s} {'speed-up':>8s} {'rule':>9s} {'error':>8s}")
    rows, totals = [], collections.Counter()
    with torch.no_grad():
        for (net, tokens, k, n), calls in sorted(shapes(args.size, dtype).items()):
            r = time_shape(tokens, k, n, dtype, args.repeats)
            print(f"{net:4s} {tokens:6d} {k:5d} {n:5d} {calls:5d} {r[names[0] + ' ms']:11.3f} {r[names[1] + ' ms']:12.3f} "
                  f"{r['speed-up']:7.2f}x {r['rule']:>9s} {r['error']:8.1e}")  # fmt: skip
            for way in names:
                totals[f"{net} {way}"] += calls * r[f"{way} ms"]
            totals[f"{net} rule"] += calls * r[f"{r['rule']} ms"]
            rows.append({"network": net, "tokens": tokens, "K": k, "N": n, "calls": calls, **r})
    for net in sorted({row["network"] for row in rows}):
        first, rule = totals[f"{net} {names[0]}"], totals[f"{net} rule"]
        print(f"{net} per forward: {names[0]} everywhere {first:.1f} ms, {names[1]} everywhere {totals[f'{net} {names[1]}']:.1f} ms, "
              f"by the rule {rule:.1f} ms ({first / rule:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "size": args.size, "dtype": args.dtype, "rows": rows, "totals": dict(totals)}, indent=1))
        print(f"saved {args.json}")


if __name__ == "__main__":
    main()
