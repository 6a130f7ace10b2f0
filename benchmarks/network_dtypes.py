"""Per network (text encoder, UNet step, VAE decode): float32 against bfloat16 on this CPU, speed
and error side by side, the measurement behind `fastdiff.precision.NETWORK_DTYPES`.

    python benchmarks/network_dtypes.py                           # SD1.5 architecture, random weights, 256 px
    python benchmarks/network_dtypes.py --size 512 --json dtypes.json
    python benchmarks/network_dtypes.py --model tiny-shapes --size 64   # trained weights (the embedded model)

Each network is the torch backend's call (fastdiff's own modules, "auto" kernels: packed oneDNN
convolutions), the backend loaded twice, in float32 and in bfloat16, and called on the same inputs, interleaved
(fp32, bf16, fp32, ...), median of `--repeats`. The error is against the float32 output: relative
RMS for the text encoder's hidden states and the UNet's noise prediction, PSNR (peak 1.0) for the
decoded image. Random weights give shape-true timings, trained weights (`--model`) realistic
errors. Needs a CPU with bf16 instructions (fastdiff.precision says which).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdiff import iospec, precision, testing
from fastdiff.backends import make_backend
from fastdiff.weights import read_configs, resolve_model

NETWORKS = ("text_encoder", "unet", "vae_decode")


def load(root: Path, dtype: torch.dtype) -> dict:
    """network -> how the torch backend calls it on the shared inputs (its own modules and casts)."""
    net = make_backend("torch", root, device=torch.device("cpu"), dtype=dtype, kernels="auto")
    return {"text_encoder": net.encode_text, "unet": net.unet, "vae_decode": net.decode}


def inputs(root: Path, size: int, seed: int) -> dict:
    """network -> its positional inputs from its I/O spec (`fastdiff.iospec.call_inputs`): one CFG
    batch of 2 for the text encoder and UNet, one image's latents for the decoder."""
    configs, g = read_configs(root), torch.Generator().manual_seed(seed)
    specs = {"text_encoder": iospec.TEXT_ENCODER, "unet": iospec.UNET, "vae_decode": iospec.VAE_DECODER}
    return {network: iospec.call_inputs(spec, configs, height=size, width=size, generator=g) for network, spec in specs.items()}


def error(network: str, ref: torch.Tensor, got: torch.Tensor) -> dict:
    ref, got = ref.double(), got.double()
    if network == "vae_decode":  # images in [-1, 1] -> [0, 1], as the pipeline shows them
        ref, got = (ref / 2 + 0.5).clamp(0, 1), (got / 2 + 0.5).clamp(0, 1)
        mse = float(((got - ref) ** 2).mean())
        return {"psnr_db": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "max_abs": float((got - ref).abs().max())}
    return {"rel_rms": testing.relative_rms(got, ref), "max_abs": float((got - ref).abs().max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", help="sd15 (its architecture, random weights) or a model name/folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not precision.cpu_runs_fast(torch.bfloat16):
        print("this CPU has no bf16 instructions (AMX-BF16 or AVX512-BF16): fastdiff runs float32 only here")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fastdiff-dtypes-") as tmp:
        if args.model == "sd15":
            print("building SD1.5 architecture with random weights ...", file=sys.stderr)
            root = testing.build_random_folder(Path(tmp) / "sd15", "sd15", seed=args.seed)
        else:
            root = resolve_model(args.model)
        nets = {dt: load(root, dt) for dt in (torch.float32, torch.bfloat16)}
        x = inputs(root, args.size, args.seed)
    times = {(n, dt): [] for n in NETWORKS for dt in nets}
    outs = {}
    with torch.inference_mode():
        for r in range(args.repeats + 1):  # the first round warms up (weight packing)
            for n in NETWORKS:
                for dt, net in nets.items():
                    t0 = time.perf_counter()
                    outs[n, dt] = net[n](*x[n]).float()
                    if r:
                        times[n, dt].append(time.perf_counter() - t0)
    rows = {}
    for n in NETWORKS:
        fp32, bf16 = (statistics.median(times[n, dt]) for dt in nets)
        rows[n] = {"fp32_s": fp32, "bf16_s": bf16, "speedup": fp32 / bf16, **error(n, outs[n, torch.float32], outs[n, torch.bfloat16])}
    env = testing.environment(torch.device("cpu"))
    print(f"{args.model}, {args.size} px, {torch.get_num_threads()} threads, {env['cpu']}; median of {args.repeats}, interleaved")
    print(f"{'network':14} {'fp32':>10} {'bf16':>10} {'bf16 speed-up':>14}  bf16 error vs fp32")
    for n, r in rows.items():
        err = f"PSNR {r['psnr_db']:.1f} dB" if "psnr_db" in r else f"relative RMS {r['rel_rms']:.2e}"
        print(f"{n:14} {r['fp32_s'] * 1e3:8.1f}ms {r['bf16_s'] * 1e3:8.1f}ms {r['speedup']:13.2f}x  {err}, max |diff| {r['max_abs']:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
