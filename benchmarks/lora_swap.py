"""LoRA hot swap: seconds to switch adapters in place, and the memory the kept base weights cost.

    python benchmarks/lora_swap.py --model sd15 --random-weights --rank 8 --repeats 5

Two random kohya-layout adapters of rank --rank on every attention projection of the UNet
(to_q / to_k / to_v / to_out.0) and the text encoder (q / k / v / out_proj), as published
style LoRAs adapt; timed: A -> B swaps and removing all (base restored), medians of --repeats.
On CUDA the step is captured first and `Pipeline.captures` must not grow across the swaps.
With --backend onnxruntime / openvino the first use of each adapter set (an export) is timed
apart (first_a, first_b); the swaps after it build sessions from cached exports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastdiff import lora, testing
from fastdiff.weights import read_configs

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def write_adapter(root: Path, path: Path, rank: int, seed: int, scale: float = 0.01) -> int:
    """A random kohya-layout adapter over every attention projection of the model at `root`
    (factors of std `scale`); returns its layer count."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    networks = lora.model_networks(read_configs(root))  # shapes only (meta device)
    for target, names in lora.module_names(networks).items():
        for name in sorted(n for n in names if n.endswith(ATTENTION)):
            w = networks[target].get_submodule(name).weight  # [out, in]
            stem = ("lora_unet_" if target == "unet" else "lora_te_") + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
            tensors[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
            tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a name or folder (default: the embedded model)")
    p.add_argument("--random-weights", action="store_true", help="with --model sd15: SD1.5's architecture, random weights")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="torch", help="torch (in-place merge) or an exported backend (an export per adapter set)")
    p.add_argument("--dtype", default=None, help="the networks' dtype (default: fastdiff's choice)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastdiff.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="fastdiff-lora-") as tmp:
        tmp = Path(tmp)
        model = testing.build_random_folder(tmp / "sd15", "sd15") if args.random_weights else (args.model or testing.TINY_SHAPES)
        pipe = Pipeline.from_pretrained(model, backend=args.backend, device=args.device, dtype=args.dtype)
        size = 64 if args.random_weights else None
        run = dict(steps=2, height=size, width=size, seed=0, output_type="np")
        pipe.generate("a cat", **run)  # captures the step on CUDA
        captures = pipe.captures
        a, b = tmp / "a.safetensors", tmp / "b.safetensors"
        layers = write_adapter(pipe.root, a, args.rank, 1)
        write_adapter(pipe.root, b, args.rank, 2)
        times = {"swap": [], "remove": []}
        if not pipe.backend.merges_lora:  # the first use of each adapter set exports it: timed apart
            for adapters, what in (({a: 1.0}, "first_a"), ({b: 0.8}, "first_b")):
                t0 = time.perf_counter()
                pipe.set_adapters(adapters)
                times[what] = [time.perf_counter() - t0]
        for _ in range(args.repeats):
            for adapters, what in (({a: 1.0}, "swap"), ({b: 0.8}, "swap"), (None, "remove")):
                t0 = time.perf_counter()
                pipe.set_adapters(adapters)
                if pipe.device.type == "cuda":
                    torch.cuda.synchronize()
                times[what].append(time.perf_counter() - t0)
        pipe.set_adapters({a: 1.0})
        pipe.generate("a cat", **run)  # the captured step replays with the adapter merged
        kept = sum(t.numel() * t.element_size() for t in getattr(pipe.backend, "base_weights", {}).values())
        res = {
            "model": str(model) if not args.random_weights else "sd15 architecture, random weights",
            "device": str(pipe.device), "dtype": str(pipe.dtype), "cpu": testing.cpu_name(),
            "backend": pipe.backend.name, "threads": torch.get_num_threads(), "rank": args.rank, "layers": layers,
            "repeats": args.repeats, **{f"{k}_s_median": statistics.median(v) for k, v in times.items()},
            "kept_base_mib": kept / 2**20, "recaptures": pipe.captures - captures,
        }  # fmt: skip
    for k, v in res.items():
        print(f"{k:18} {v:.4f}" if isinstance(v, float) else f"{k:18} {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["recaptures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
