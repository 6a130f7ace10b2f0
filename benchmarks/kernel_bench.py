"""Triton kernels vs torch's own ops on SD1.5's shapes (512x512, batch 2 for classifier-free guidance).

    python benchmarks/kernel_bench.py                     # fp16, prints a table
    python benchmarks/kernel_bench.py --dtype bf16 --json kernels.json

Pairs timed, same inputs for both sides:
  attention   fastdiff.kernels.attention  vs F.scaled_dot_product_attention   (TFLOP/s: 4 B H Sq Sk D)
  group_norm  fastdiff.kernels.group_norm(silu=True) vs F.silu(F.group_norm)  (GB/s: read x + write y)
  geglu       fastdiff.kernels.geglu      vs chunk + x * F.gelu(gate)         (GB/s: read h + write out)
  layer_norm  torch's F.layer_norm alone, against its ceiling: is a kernel worth writing?
q/k/v are slices of a packed projection, as the UNet makes them. The config column says what the
autotuner (attention) or the launch-plan tuner (GroupNorm) chose, with the fastest candidates' times,
and how long the first call took (compilation and tuning: what a fresh process pays once).

Two times per side. "graph": the op on each of several input sets (together >= 256 MiB, 5x the
L2, so every call reads HBM) captured in one CUDA graph and replayed, median per call: what the
pipeline's captured step sees, with no launch gaps. "eager": triton.testing.do_bench on one input
set (L2 flushed), median: includes Python launch cost when that exceeds the GPU time.
Rates and speed-up (torch time / triton time) are from the graph times. Ceilings measured in the
same run: an 8192^3 matmul in the benchmark dtype (TFLOP/s) and, for the memory-bound ops, a
device-to-device copy moving the same bytes over the same number of input sets, graph-timed the
same way (GB/s, read + write: small shapes cannot reach the 1 GiB copy rate, whose launch costs
vanish). Needs CUDA; on CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.sd15 import ATTENTION_SHAPES

GROUP_NORM_SHAPES = [(2, c, s, s) for c in (320, 640, 1280) for s in (64, 32, 16, 8)]
# The VAE decoder's largest GroupNorm input (64 MB in fp16, beyond L2, where the last-first plans
# are offered): its own runner, last, so a step cut at its time limit loses only this row.
VAE_GROUP_NORM_SHAPES = [(1, 128, 512, 512)]
# GEGLU input [B, tokens, 2 * inner] with inner = 4 * channels: 320 @ 64x64, 640 @ 32, 1280 @ 16 and 8.
GEGLU_SHAPES = [(2, 4096, 2560), (2, 1024, 5120), (2, 256, 10240), (2, 64, 10240)]
# LayerNorm input [B, tokens, channels] in the transformer blocks: 320 @ 64x64 ... 1280 @ 8x8.
LAYER_NORM_SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280)]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
DEVICE = "cuda"


ROTATE_BYTES = 256 * 2**20  # input sets per shape add up to at least this (H200 L2: 50 MB)


def n_sets(nbytes: int) -> int:
    """How many input sets of `nbytes` each make the graph-timed calls read HBM, not L2."""
    return max(2, min(64, -(-ROTATE_BYTES // nbytes)))


def bench_graph(fn, calls: int, reps: int = 20) -> float:
    """Median milliseconds per call, `fn` making `calls` calls: kernels.tuning.time_ms (CUDA-graph
    replays of back-to-back fn() calls, the timer the launchers tune with) divided by `calls`."""
    from fastdiff.kernels import tuning

    return tuning.time_ms(fn, replays=reps) / calls


@functools.lru_cache(maxsize=None)  # both GroupNorm layouts of a shape move the same bytes
def copy_ms(nbytes: int, n: int) -> float:
    """Graph-timed ms of a device copy moving `nbytes` (read + write) per call, over n buffer pairs."""
    def buf():
        return torch.empty(nbytes // 2, device=DEVICE, dtype=torch.uint8)

    pairs = [(buf(), buf()) for _ in range(n)]  # (dst, src)
    return bench_graph(lambda: [dst.copy_(src) for dst, src in pairs], n)


def first_call_s(fn) -> float:
    """Seconds of the first call (compilation and the tuners' timing included), synchronised."""
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_pair(ours, ref, sets: list) -> dict:
    """Graph and eager medians (ms) of ours(*inputs) and ref(*inputs); graph over every set."""
    def graphed(op):
        try:
            return bench_graph(lambda: [op(*x) for x in sets], len(sets))
        except Exception as e:  # noqa: BLE001 - one op that cannot be captured must not stop the table
            print(f"  could not time {getattr(op, '__name__', op)} in a graph: {type(e).__name__}: {e}")
            return float("nan")

    return dict(
        triton_ms=graphed(ours),
        torch_ms=graphed(ref),
        triton_eager_ms=bench(lambda: ours(*sets[0])),
        torch_eager_ms=bench(lambda: ref(*sets[0])),
    )


def bench(fn) -> float:
    """Median milliseconds; one call first so autotuning and compilation stay out of the timing."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def ceilings(dtype) -> dict:
    n = 8192
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    ms = bench(lambda: a @ b)
    src = torch.empty(2**30, device=DEVICE, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    return {"matmul_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * src.numel() / copy_ms / 1e6}


def _config_name(c) -> str:
    """'128x64 w8 s3', plus ' split' (head dim in two parts) and ' overlap' (OVERLAP_QK): the
    overlap configs share their tiles with plain ones, so without it the two read the same."""
    split = " split" if c.kwargs.get("SPLIT_D") else ""
    overlap = " overlap" if c.kwargs.get("OVERLAP_QK") else ""
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}{split}{overlap}"


def _chosen_config(autotuner) -> str:
    """The tile config the autotuner picked on its last call and the fastest candidates'
    times: '128x64 w8 s3 (128x64 w8 s3 150.2us; ...)'. Triton 3.6 also fills those times from its
    disk cache (cache_results), so on a machine that tuned before they are that earlier run's."""
    chosen = _config_name(autotuner.best_config)
    timings = getattr(autotuner, "configs_timings", None)
    if not timings:
        return chosen
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], (list, tuple)) else kv[1])
    ms = [(t[0] if isinstance(t, (list, tuple)) else t) for _, t in ranked]
    return chosen + " (" + "; ".join(f"{_config_name(c)} {m * 1000:.1f}us" for (c, _), m in zip(ranked[:3], ms)) + ")"


def _gpu_kernel_names(fn) -> str:
    """The GPU kernels one call of `fn` launches (which SDPA backend torch picked, say)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    except Exception as e:  # noqa: BLE001 - a diagnostic line must not stop the benchmark
        return f"? (profiler: {type(e).__name__}: {e})"
    return ", ".join(sorted(n[:60] for n in names)) or "?"


def run_attention(dtype):
    from fastdiff.kernels import attention as attn_mod
    from fastdiff.kernels.attention import attention

    autotuner = attn_mod.AUTOTUNER

    def make(B, H, Sq, Sk, D):
        if Sq == Sk:
            qkv = torch.randn(B, Sq, 3, H, D, device=DEVICE, dtype=dtype)
            return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v each [B, H, S, D]
        q = torch.randn(B, Sq, H, D, device=DEVICE, dtype=dtype).transpose(1, 2)  # [B, H, Sq, D]
        kv = torch.randn(B, Sk, 2, H, D, device=DEVICE, dtype=dtype)
        return (q, *kv.permute(2, 0, 3, 1, 4).unbind(0))  # k, v each [B, H, Sk, D]

    for B, H, Sq, Sk, D in ATTENTION_SHAPES:
        nbytes = 2 * B * H * (Sq + Sk) * D * dtype.itemsize  # q + out, k + v
        sets = [make(B, H, Sq, Sk, D) for _ in range(n_sets(nbytes))]
        q, k, v = sets[0]
        autotuner.configs_timings = None  # set again only if this first call times the candidates
        first_s = first_call_s(lambda: attention(q, k, v))
        ours, ref = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
        config = _chosen_config(autotuner)
        splits = [v for key, v in attn_mod.TUNED_SPLITS.items() if key[:6] == (B, H, Sq, Sk, D, dtype)]
        if splits and splits[0][1]:  # the key-split tuner ran: its choice and each candidate's time
            n, times = splits[0]
            # Each split count is its own autotune key and the last one tuned was not necessarily
            # the chosen one: the tile timings left on the autotuner may be another split's.
            config = _config_name(autotuner.best_config)
            config = f"keys/{n} ({'; '.join(f'/{k} {ms * 1000:.1f}us' for k, ms in times.items())}) " + config
        if (B, H, Sq, Sk, D) == ATTENTION_SHAPES[0]:
            print(f"SDPA at {B, H, Sq, Sk, D} runs: {_gpu_kernel_names(lambda: F.scaled_dot_product_attention(q, k, v))}")
        flops = 4 * B * H * Sq * Sk * D
        t = timed_pair(attention, F.scaled_dot_product_attention, sets)
        yield dict(
            kernel="attention", shape=f"B{B} H{H} Sq{Sq} Sk{Sk} D{D}", **t, unit="TFLOP/s",
            triton_rate=flops / t["triton_ms"] / 1e9, torch_rate=flops / t["torch_ms"] / 1e9,
            max_abs_diff=(ours.float() - ref.float()).abs().max().item(), config=config, first_call_s=first_s,
        )  # fmt: skip


def run_group_norm(dtype, shapes=None):
    from fastdiff.kernels.group_norm import TUNED as tuned
    from fastdiff.kernels.group_norm import group_norm

    def ours(x, w, b):
        return group_norm(x, 32, w, b, 1e-5, silu=True)

    def ref(x, w, b):
        return F.silu(F.group_norm(x, 32, w, b, 1e-5))

    for shape in GROUP_NORM_SHAPES if shapes is None else shapes:
        for layout in ("nchw", "nhwc"):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize  # read x, write y
            sets = [
                (
                    torch.randn(shape, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt),
                    torch.randn(shape[1], device=DEVICE, dtype=dtype),
                    torch.randn(shape[1], device=DEVICE, dtype=dtype),
                )
                for _ in range(n_sets(nbytes))
            ]
            first_s = first_call_s(lambda: ours(*sets[0]))
            t = timed_pair(ours, ref, sets)
            x3 = sets[0][0].view(shape[0], shape[1], -1)  # [B, C, HW], as the launcher keys its plans
            plan = [v for k, v in tuned.items() if k[:5] == (*x3.shape, 32, x3.stride()) and k[6] == dtype]
            config = ""
            if plan:
                _, times = plan[0]
                ranked = sorted(times.items(), key=lambda kv: kv[1])  # up to 9 plans: the 4 fastest
                shown = "; ".join(f"{n} {ms * 1000:.1f}us" for n, ms in ranked[:4])
                config = f"{ranked[0][0]} ({shown}{f'; {len(ranked) - 4} more' if len(ranked) > 4 else ''})"
            yield dict(
                kernel="group_norm+silu", shape=f"{list(shape)} {layout}", **t, unit="GB/s",
                triton_rate=nbytes / t["triton_ms"] / 1e6, torch_rate=nbytes / t["torch_ms"] / 1e6,
                ceiling=nbytes / copy_ms(nbytes, len(sets)) / 1e6, config=config, first_call_s=first_s,
                max_abs_diff=(ours(*sets[0]).float() - ref(*sets[0]).float()).abs().max().item(),
            )  # fmt: skip


def run_group_norm_vae(dtype):
    yield from run_group_norm(dtype, VAE_GROUP_NORM_SHAPES)


def run_layer_norm(dtype):
    """torch's own LayerNorm only: whether a fused kernel could gain is its distance from copy."""
    for shape in LAYER_NORM_SHAPES:
        nbytes = 2 * torch.Size(shape).numel() * dtype.itemsize  # read x, write y
        c = shape[-1]
        sets = [
            (torch.randn(shape, device=DEVICE, dtype=dtype), torch.randn(c, device=DEVICE, dtype=dtype),
             torch.randn(c, device=DEVICE, dtype=dtype))
            for _ in range(n_sets(nbytes))
        ]  # fmt: skip
        ms = bench_graph(lambda: [F.layer_norm(x, (c,), w, b, 1e-5) for x, w, b in sets], len(sets))
        yield dict(
            kernel="layer_norm", shape=str(list(shape)), triton_ms=float("nan"), torch_ms=ms,
            triton_eager_ms=float("nan"), torch_eager_ms=bench(lambda: F.layer_norm(sets[0][0], (c,), sets[0][1], sets[0][2], 1e-5)),
            unit="GB/s", triton_rate=float("nan"), torch_rate=nbytes / ms / 1e6,
            ceiling=nbytes / copy_ms(nbytes, len(sets)) / 1e6, max_abs_diff=float("nan"), config="torch only",
        )  # fmt: skip


def run_geglu(dtype):
    from fastdiff.kernels.geglu import geglu

    def ref(h):
        x, gate = h.chunk(2, dim=-1)
        return x * F.gelu(gate)

    for shape in GEGLU_SHAPES:
        nbytes = torch.Size(shape).numel() * dtype.itemsize * 3 // 2  # read h, write half of it
        sets = [(torch.randn(shape, device=DEVICE, dtype=dtype),) for _ in range(n_sets(nbytes))]
        first_s = first_call_s(lambda: geglu(*sets[0]))
        t = timed_pair(geglu, ref, sets)
        h = sets[0][0]
        yield dict(
            kernel="geglu", shape=str(list(shape)), **t, unit="GB/s",
            triton_rate=nbytes / t["triton_ms"] / 1e6, torch_rate=nbytes / t["torch_ms"] / 1e6,
            ceiling=nbytes / copy_ms(nbytes, len(sets)) / 1e6, first_call_s=first_s,
            max_abs_diff=(geglu(h).float() - ref(h).float()).abs().max().item(),
        )  # fmt: skip


HEADER = (
    f"{'kernel':16} {'shape':30} {'triton ms':>10} {'torch ms':>10} {'speed-up':>8} "
    f"{'triton':>9} {'torch':>9} {'ceiling':>9} {'of ceil':>7}  unit     max|diff|  eager ms (triton/torch)  config"
)


def print_header() -> None:
    print("triton / torch ms: median per call, graph-replayed over input sets of >= 256 MiB in all (HBM, no launch gaps)")
    print("ceiling: the 8192^3 matmul (TFLOP/s), or a copy of the same bytes timed the same way (GB/s)")
    print(HEADER)
    print("-" * len(HEADER))


def finish_row(r: dict, ceil: dict) -> None:
    """Adds speedup, ceiling and of_ceiling to a row and prints it."""
    c = r.setdefault("ceiling", ceil["matmul_tflops"])
    r["speedup"] = r["torch_ms"] / r["triton_ms"]
    rate = r["torch_rate"] if r["kernel"] == "layer_norm" else r["triton_rate"]
    r["of_ceiling"] = rate / c
    print(
        f"{r['kernel']:16} {r['shape']:30} {r['triton_ms']:10.4f} {r['torch_ms']:10.4f} {r['speedup']:7.2f}x "
        f"{r['triton_rate']:9.1f} {r['torch_rate']:9.1f} {c:9.1f} {r['of_ceiling']:7.0%}  {r['unit']:8} {r['max_abs_diff']:<9.2g}  "
        f"{r['triton_eager_ms']:10.4f} / {r['torch_eager_ms']:<10.4f} {r.get('config', '')}"
        + (f" [first call {r['first_call_s']:.1f}s]" if "first_call_s" in r else ""),
        flush=True,
    )


# The goals the kernels are held to (issue #6): attention at least as fast as torch's SDPA at every
# shape, GroupNorm+SiLU at 70% or more of a same-bytes copy.
GOALS = {"attention": ("speedup", 1.0, "x SDPA"), "group_norm+silu": ("of_ceiling", 0.70, " of copy")}


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per goal: how many rows meet it, and the worst row."""
    lines = []
    for kernel, (field, bound, unit) in GOALS.items():
        mine = [r for r in rows if r["kernel"] == kernel]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r[field])
        met = sum(r[field] >= bound for r in mine)
        fmt = (lambda v: f"{v:.0%}") if field == "of_ceiling" else (lambda v: f"{v:.2f}")
        lines.append(
            f"goal {kernel} >= {fmt(bound)}{unit}: {met}/{len(mine)} shapes met; "
            f"worst {fmt(worst[field])}{unit} at {worst['shape']}"
        )
    return lines


def _stopped(signum, frame):
    raise SystemExit(124)  # as `timeout` reports it, after main's finally has printed the goal lines


def main(argv=None) -> int:
    runners = {"attention": run_attention, "group_norm": run_group_norm, "geglu": run_geglu, "layer_norm": run_layer_norm,
               "group_norm_vae": run_group_norm_vae}  # in this order; read at the call (tests replace some)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--only", choices=list(runners), action="append")
    parser.add_argument("--json", type=Path, help="save the results (and the environment) here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py needs a CUDA device: the Triton kernels only run compiled there.")
        return 0

    from fastdiff import testing

    dtype = DTYPES[args.dtype]
    ceil = ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}  {args.dtype}  ceilings: matmul {ceil['matmul_tflops']:.0f} TFLOP/s, "
          f"copy {ceil['copy_gbps']:.0f} GB/s")  # fmt: skip
    print_header()
    env = testing.environment(torch.device(DEVICE)) if args.json else None
    rows = []
    signal.signal(signal.SIGTERM, _stopped)  # device_check's `timeout`: the goal lines still print
    try:
        for name in args.only or list(runners):
            for r in runners[name](dtype):  # each row printed and saved as it lands: a cut run keeps them
                finish_row(r, ceil)
                rows.append(r)
                if args.json:
                    result = {"dtype": args.dtype, "ceilings": ceil, "rows": rows, "environment": env}
                    args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:  # over the rows measured (a cut run: its goal lines count fewer shapes)
        for line in goal_lines(rows):
            print(line, flush=True)
    if args.json:
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
