"""python -m fastdiff.export MODEL: ONNX (and TensorRT) files for the onnxruntime / openvino / tensorrt backends.

Examples:
    python -m fastdiff.export sd15                          # dynamic batch / size, fp32, cached
    python -m fastdiff.export sd15 --fp16 --static --batch 1 --height 512 --width 512
    python -m fastdiff.export ./my-sd-folder --out ./onnx-sd
    python -m fastdiff.export sd15 --random-weights          # SD1.5 architecture, for timing only
    python -m fastdiff.export sd15 --engine tensorrt         # fp16 TensorRT engines from the ONNX files
    python -m fastdiff.export sd15 --format openvino         # the export openvino compiles, checked to compile
"""

from __future__ import annotations

import argparse
import sys
import time

from fastdiff.__main__ import configure_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastdiff.export", description=__doc__.split("\n")[0])
    p.add_argument("model", help="sd15, tiny-shapes, a diffusers-format folder, or a single-file .safetensors checkpoint (LDM layout, SD1.5 configs)")
    p.add_argument("--config", default=None, help="for a single-file checkpoint: the diffusers folder whose configs it follows")
    p.add_argument("--out", default=None, help="export folder (default: under $FASTDIFF_CACHE or ~/.cache/fastdiff)")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and activations (norm statistics in fp32)")
    p.add_argument("--static", action="store_true", help="fixed shapes (--batch/--height/--width) instead of dynamic axes")
    p.add_argument("--batch", type=int, default=1, help="images per call (CFG doubles the UNet batch)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument(
        "--attention", choices=("mha", "plain"), default=None,
        help="mha: com.microsoft MultiHeadAttention nodes (onnxruntime; default); plain: MatMul/Softmax/MatMul "
        "(default for --engine tensorrt)",
    )
    p.add_argument(
        "--engine", "--format", choices=("onnx", "tensorrt", "openvino"), default="onnx",
        help="openvino: the float32 MHA export the openvino backend compiles (bf16 is its compile option), "
        "compiled once here as a check",
    )
    p.add_argument("--lora", action="append", metavar="PATH[=WEIGHT]",
                   help="merge this LoRA adapter (.safetensors) with WEIGHT (default 1) before exporting; repeatable")
    p.add_argument("--random-weights", action="store_true", help="with sd15: SD1.5 architecture, random weights (timing)")
    p.add_argument("--force", action="store_true", help="rebuild even if a valid export with the same key exists")
    p.add_argument("-v", "--verbose", action="store_true", help="also show the exporter's own log messages and warnings")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)

    if args.engine == "tensorrt":
        from fastdiff.export.tensorrt import TensorRTUnavailable, require_tensorrt

        try:
            require_tensorrt()  # before any export work: nothing is attempted silently
        except TensorRTUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    if args.engine == "openvino":
        try:
            import openvino  # noqa: F401 - before any export work
        except ImportError:
            print("error: --format openvino needs the openvino package: pip install 'fastdiff[openvino]'", file=sys.stderr)
            return 2
        if args.fp16 or args.attention == "plain":
            print("error: --format openvino compiles the float32 MHA export: drop --fp16 / --attention plain", file=sys.stderr)
            return 2

    from fastdiff import lora
    from fastdiff.export.cache import Shapes
    from fastdiff.export.onnx_export import ExportError, export
    from fastdiff.weights import ModelNotFoundError

    static = Shapes(args.batch, args.height, args.width) if args.static else None
    attention = args.attention or ("plain" if args.engine == "tensorrt" else "mha")
    precision = "fp16" if args.fp16 and args.engine == "onnx" else "fp32"  # TensorRT: fp16 engines from fp32 ONNX
    t0 = time.perf_counter()
    try:
        adapters = lora.from_cli(args.lora)
        folder = export(
            args.model,
            precision=precision,
            static=static,
            attention=attention,
            out=args.out,
            random_weights=args.random_weights,
            force=args.force,
            config=args.config,
            adapters=adapters,
        )
    except (ModelNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: export check failed: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    _report(folder, seconds)

    if args.engine == "tensorrt":
        from fastdiff.export.tensorrt import Profile, build_engines

        profile = Profile.for_request(args.batch, args.height, args.width, static=args.static)
        engines = build_engines(folder, profile)
        print(f"tensorrt engines: {engines}")
    if args.engine == "openvino":
        import torch

        from fastdiff.backends.openvino_backend import OpenVINOBackend

        t0 = time.perf_counter()
        OpenVINOBackend(folder, device=torch.device("cpu"), dtype=torch.float32)
        print(f"openvino     compiled for this CPU in {time.perf_counter() - t0:.1f} s (the backend compiles at load)")
    return 0


def _report(folder, seconds: float) -> None:
    from fastdiff.export.cache import read_manifest

    m = read_manifest(folder) or {}
    print(f"export       {folder}")
    print(f"took         {seconds:8.1f} s (this run; a reused export takes no export time)")
    for name, facts in m.get("networks", {}).items():
        print(
            f"{name:12s} {facts['seconds']:8.1f} s export  {facts['bytes'] / 1e6:9.1f} MB  "
            f"max abs err vs torch {facts['max_abs_err']:.2e}"
        )
    if m.get("random_weights"):
        print("note         random weights: for timing only; never used as the real model")


if __name__ == "__main__":
    sys.exit(main())
