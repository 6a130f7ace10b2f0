"""Command line: python -m fastdiff "a red circle on a blue background" -o out.png
(img2img: --image in.png [--strength 0.8]; inpainting: --image in.png --mask mask.png)"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def main(argv=None) -> int:
    from fastdiff.pipeline import BACKENDS, SCHEDULER_NAMES

    p = argparse.ArgumentParser(prog="python -m fastdiff", description="Text to image, img2img and inpainting with fastdiff.")
    p.add_argument("prompt")
    p.add_argument("-o", "--output", default="out.png", help="PNG path; with --num-images N, _0.._N-1 are appended")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--scheduler", default="dpmpp_2m", choices=SCHEDULER_NAMES)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--image", default=None, help="img2img: the start image (its size is the output's unless --height/--width)")
    p.add_argument("--mask", default=None, help="with --image, inpainting: white repaints, black keeps")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the schedule runs from --image, in (0, 1] (default 0.8 img2img, 1.0 inpainting)")
    p.add_argument("--lora", action="append", metavar="PATH[=WEIGHT]",
                   help="a LoRA adapter (.safetensors, diffusers/PEFT or kohya layout) merged with WEIGHT (default 1); repeatable")
    p.add_argument("--model", default=None, help="a name (sd15, tiny-shapes) or a diffusers-format folder")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="the networks' dtype (default: fp16 on CUDA; on CPUs with bf16 instructions bf16, else fp32)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show other libraries' log messages")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    configure_logging(args.verbose)

    try:
        return run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line per error for a command-line user; --debug for the rest
        if args.debug:
            raise
        message = str(e).strip().splitlines() or [""]
        kind = "" if isinstance(e, (ValueError, FileNotFoundError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{message[0]}" + (" (more with --debug)" if len(message) > 1 else ""), file=sys.stderr)
        return 2 if isinstance(e, (ValueError, FileNotFoundError)) else 1


def configure_logging(verbose: bool) -> None:
    """fastdiff's own progress at INFO; other libraries' logs and Python warnings (torch's ONNX
    exporter prints dozens of lines per network on a first export) only with -v, else errors only."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("fastdiff").setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    for name in ("py.warnings", "torch", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.ERROR)


def check_output(path: str, count: int) -> list[str]:
    """The PNG paths to write, checked before any model work: the folder exists and is writable,
    and PIL knows the extension."""
    from PIL import Image

    paths = [path] if count == 1 else [_numbered(path, i) for i in range(count)]
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise ValueError(f"--output {path!r}: unknown image extension {ext or '(none)'!r}; use e.g. out.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"--output {path!r}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--output {path!r}: folder {folder} is not writable")
    for p in paths:
        if os.path.isdir(p):
            raise ValueError(f"--output {p!r} is a folder; give a file name such as out.png")
    return paths


def save_atomically(image, path: str) -> None:
    """Write to a temporary file beside `path`, then rename: never a half-written image at `path`."""
    from PIL import Image

    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format=Image.registered_extensions()[os.path.splitext(path)[1].lower()])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args) -> int:
    from fastdiff import lora
    from fastdiff.editing import read_image
    from fastdiff.pipeline import Limits, ModelFacts, Pipeline, check_args, check_request, read_edit
    from fastdiff.weights import read_configs, resolve_model

    check_args(
        args.prompt, args.negative_prompt, args.steps, args.guidance_scale, args.height, args.width,
        args.scheduler, args.num_images, "pil", args.seed,
    )
    paths = check_output(args.output, args.num_images)
    image = read_image("--image", args.image) if args.image is not None else None  # unreadable files named here
    mask = read_image("--mask", args.mask) if args.mask is not None else None
    model = resolve_model(args.model)
    facts = ModelFacts.read(model)
    edit = read_edit(facts, image, mask, args.strength, args.height, args.width)
    check_request(facts, Limits.from_env(), args.steps, args.height, args.width, args.scheduler, args.num_images,
                  edit=edit)  # fmt: skip
    adapters = lora.from_cli(args.lora)
    lora.read_adapters(adapters, lora.model_modules(read_configs(model)))  # bad files named before loading
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(model, backend=args.backend, device=args.device, dtype=args.dtype)
    pipe.set_adapters(adapters)  # an exported backend exports the adapted model here, once
    load_s = time.perf_counter() - t0
    result = pipe.run(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        seed=args.seed,
        scheduler=args.scheduler,
        num_images=args.num_images,
        output_type="pil",
        image=image,
        mask_image=mask,
        strength=args.strength,
        timed=True,
    )
    images = result.images if isinstance(result.images, list) else [result.images]
    for im, path in zip(images, paths):
        save_atomically(im, path)
    t = result.timings
    print(f"model        {pipe.facts.model_name} ({pipe.backend.name}, {pipe.device}, {str(pipe.dtype).replace('torch.', '')})")
    print(f"load         {load_s:8.3f} s")
    print(f"text encoder {t['text_encoder']:8.3f} s")
    if "vae_encode" in t:
        print(f"vae encode   {t['vae_encode']:8.3f} s")
    print(f"denoise      {t['denoise']:8.3f} s  ({t['unet_step'] * 1000:.1f} ms per UNet step)")
    print(f"vae decode   {t['vae_decode']:8.3f} s")
    print(f"end to end   {t['end_to_end']:8.3f} s")
    print("wrote " + ", ".join(paths))
    return 0


def _numbered(path: str, i: int) -> str:
    stem, dot, ext = path.rpartition(".")
    return f"{stem}_{i}.{ext}" if dot else f"{path}_{i}"


if __name__ == "__main__":
    sys.exit(main())
