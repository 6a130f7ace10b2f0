"""Command line: python -m fastdiff "a red circle on a blue background" -o out.png"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def main(argv=None) -> int:
    from fastdiff.pipeline import BACKENDS, SCHEDULER_NAMES

    p = argparse.ArgumentParser(prog="python -m fastdiff", description="Text to image with fastdiff.")
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
    p.add_argument("--model", default=None, help="a name (sd15, tiny-shapes) or a diffusers-format folder")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from fastdiff.pipeline import Pipeline, check_args

    try:
        check_args(
            args.prompt, args.negative_prompt, args.steps, args.guidance_scale, args.height, args.width,
            args.scheduler, args.num_images, "pil",
        )
        t0 = time.perf_counter()
        pipe = Pipeline.from_pretrained(args.model, backend=args.backend, device=args.device)
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
            timed=True,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = result.images if isinstance(result.images, list) else [result.images]
    paths = [args.output] if len(images) == 1 else [_numbered(args.output, i) for i in range(len(images))]
    for im, path in zip(images, paths):
        im.save(path)
    t = result.timings
    print(f"model        {pipe.model_name} ({pipe.backend.name}, {pipe.device}, {str(pipe.dtype).replace('torch.', '')})")
    print(f"load         {load_s:8.3f} s")
    print(f"text encoder {t['text_encoder']:8.3f} s")
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
