"""A CPU forward without Python between its ops: fastdiff's eager default against the same module
under torch.compile (inductor, freezing; with and without `cpp_wrapper`), paired round by round
(a round: a block of calls of each way in turn, its median; single calls interleaved would charge
each way for the previous one's OpenMP threads still spinning).

    python benchmarks/compiled_cpu.py --size 256 --dtype bfloat16            # SD1.5, random weights: the AMX question
    python benchmarks/compiled_cpu.py --model tiny-shapes --size 64 --threads 1   # the CI gate's model and config
    python benchmarks/compiled_cpu.py --network vae_decode --json compiled.json

Why: on the AMX host the bf16 UNet spends 7-18% of a forward between its ops, and a compiled forward
has none (benchmarks/NOTES-cpu.md has the answers: there inductor's kernels lost). Under
torch.compile the ops seam takes torch's reference ops (`fastdiff.ops.tracing()`), so the compiled
forward runs inductor's kernels (oneDNN convolutions and linears on weights it packs when frozen,
its own C++ loops for the rest) where the eager default runs fastdiff's packed oneDNN, few-rows
and attention kernels: which wins per call, and how many calls pay back the compile. Both sides
are the torch backend's modules loaded once, in the precision asked for; the compiled side is
called as the backend calls its module (inputs cast, no autograd). The error is the compiled
output's against the eager one's.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdiff import iospec, precision, testing
from fastdiff.backends import make_backend
from fastdiff.weights import find_weights, parameter_count, read_configs, resolve_model


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a name or folder; default: SD1.5's architecture with seeded random weights")
    p.add_argument("--network", choices=("unet", "vae_decode"), default="unet")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--dtype", choices=tuple(precision.DTYPE_NAMES), default=None, help="default: this CPU's (fastdiff.precision)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=7, help="paired rounds after the warm-up (each a block of calls per way)")
    p.add_argument("--no-cpp-wrapper", action="store_true", help="skip the cpp_wrapper compile (it takes the longest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.size <= 0 or args.size % 8:
        p.error(f"--size {args.size}: a positive multiple of 8")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: at least 1")
    return args


def inputs(root: Path, network: str, size: int, seed: int) -> tuple:
    """The module's positional inputs from the network's I/O spec (`fastdiff.iospec.call_inputs`): a
    CFG batch of 2 for the UNet, one image's latents for the decoder."""
    net = iospec.UNET if network == "unet" else iospec.VAE_DECODER
    return iospec.call_inputs(net, read_configs(root), height=size, width=size, generator=torch.Generator().manual_seed(seed))


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dtype = precision.check_dtype(device, args.dtype, "--dtype") if args.dtype else None  # before minutes of model building
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            root, what = testing.build_random_folder(Path(tmp) / "sd15", "sd15", seed=args.seed), "sd15 architecture, random weights"
        else:
            root, what = Path(resolve_model(args.model)), args.model
        dtype = dtype or precision.default_dtype(device, unet_params=parameter_count(find_weights(root / "unet")))
        net = make_backend("torch", root, device=device, dtype=dtype, kernels="auto")
        x = inputs(root, args.network, args.size, args.seed)
        if args.network == "unet":
            module = net.network("unet")
            eager = lambda: net.unet(*x)  # noqa: E731 - the backend's own call, "auto" kernels
            cast = (x[0].to(dtype), x[1], x[2].to(dtype))
        else:
            module = net.network("vae")  # its forward is the decode
            eager = lambda: net.decode(*x)  # noqa: E731
            cast = (x[0].to(dtype),)
        ref = eager().float()  # before any compile: freezing must leave the module's weights as they were
        ways = {"eager": eager}
        compile_s = {}
        wrappers = (False,) if args.no_cpp_wrapper else (False, True)
        for cpp_wrapper in wrappers:
            name = "compiled+cpp_wrapper" if cpp_wrapper else "compiled"
            compiled = torch.compile(module, backend="inductor", options={"freezing": True, "cpp_wrapper": cpp_wrapper})

            def call(compiled=compiled):
                with torch.no_grad():
                    return compiled(*cast)

            start = time.perf_counter()
            call()  # the compile
            compile_s[name] = time.perf_counter() - start
            print(f"{name}: compiled in {compile_s[name]:.1f} s", file=sys.stderr)
            ways[name] = call
        errors = {name: float((call().float() - ref).abs().max()) for name, call in ways.items() if name != "eager"}
        times: dict = {name: [] for name in ways}
        for call in ways.values():
            call()  # warm-up: packing, layouts timed at first use
        start = time.perf_counter()
        eager()
        block = max(1, min(20, round(0.5 / (time.perf_counter() - start))))  # about half a second a block
        for _ in range(args.repeats):
            for name, call in ways.items():
                call()  # untimed: the first call after the other way's pays for its threads and caches
                block_s = []
                for _ in range(block):
                    start = time.perf_counter()
                    call()
                    block_s.append(time.perf_counter() - start)
                times[name].append(statistics.median(block_s))
    cpu = testing.cpu_name()
    print(f"# {args.network}, {what}, {args.size} px, {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"{args.repeats} paired rounds; CPU {cpu!r}; torch {torch.__version__}, Python {platform.python_version()}")
    result = {"network": args.network, "model": what, "size": args.size, "dtype": str(dtype), "threads": torch.get_num_threads(),
              "cpu": cpu, "torch": torch.__version__, "compile_s": compile_s, "max_abs_vs_eager": errors, "ms": {}, "speedup": {}}
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        result["ms"][name] = ms
        line = f"{name:22s} {ms:9.1f} ms"
        if name != "eager":
            ratios = sorted(e / c for e, c in zip(times["eager"], ts))  # paired by round
            result["speedup"][name] = {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1]}
            line += (f"   {statistics.median(ratios):.2f}x eager [{ratios[0]:.2f}-{ratios[-1]:.2f}], compile {compile_s[name]:.0f} s, "
                     f"max abs vs eager {errors[name]:.2e}")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
