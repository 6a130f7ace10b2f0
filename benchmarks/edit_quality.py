"""img2img and inpainting quality on the embedded model (tiny-shapes), measured by the data set's
pixel classifier, with a picture of each case (input, mask, outputs).

    python benchmarks/edit_quality.py --seeds 16 --out benchmarks/results/edit-quality

img2img: a large red circle in the centre, prompted as a blue one: the colour must change and the
position stay (IoU of the foreground with the input's; POINTS says where each can be had). Inpainting: a small red square on the
left, a mask over the right third, prompted "a small blue circle on the right": inside the mask
the classifier must read a blue circle where the data set draws one (IoU), outside the picture must
stay (mean change against the input; the VAE round trip of the input alone is printed beside it,
the floor any latent inpainting without paste-back has).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from fastdiff import testing

shapes = testing.load_script(Path(__file__).resolve().parents[1] / "training" / "shapes_data.py")

BACKGROUND = "gray"
IMG2IMG = dict(
    source=shapes.Scene("circle", "red", BACKGROUND, "large", "center"),
    prompt="a large blue circle in the center on a gray background",
    want=("blue", "circle"),
)
INPAINT = dict(
    source=shapes.Scene("square", "red", BACKGROUND, "small", "left"),
    prompt="a small blue circle on the right on a gray background",
    target=shapes.Scene("circle", "blue", BACKGROUND, "small", "right"),
    box=(12, 30, 52, 62),  # mask rows y0:y1, columns x0:x1 (px): the right third, clear of the square
)


def foreground(image: np.ndarray) -> np.ndarray:
    """[H, W] bool: pixels farther than the classifier's threshold from the gray background."""
    bg = np.array(shapes.COLOURS[BACKGROUND], np.float32)
    return np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > shapes.FG_THRESHOLD


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def inpaint_mask() -> np.ndarray:
    y0, x0, y1, x1 = INPAINT["box"]
    m = np.zeros((shapes.SIZE, shapes.SIZE), np.uint8)  # [H, W]: 255 = repaint
    m[y0:y1, x0:x1] = 255
    return m


def to_u8(x: np.ndarray) -> np.ndarray:
    return (x * 255).round().astype(np.uint8)


# (mode, strength, guidance): img2img where the colour changes (the embedded model decides colour
# and position together, at high noise, so the circle moves: its IoU says by how much) and where
# the picture is kept (low guidance, half the schedule); inpainting at the default guidance and at 2.
POINTS = (("img2img", 0.75, 7.5), ("img2img", 0.5, 2.0), ("inpaint", 1.0, 7.5), ("inpaint", 1.0, 2.0))


def img2img_case(pipe, seed: int, strength: float, guidance: float, steps: int) -> tuple[dict, np.ndarray]:
    src = shapes.render(IMG2IMG["source"])
    out = to_u8(pipe.generate(IMG2IMG["prompt"], image=src, strength=strength, guidance_scale=guidance, steps=steps,
                              seed=seed, output_type="np")[0])  # fmt: skip
    colour, kind = shapes.classify(out)
    return {"colour": colour == IMG2IMG["want"][0], "shape": kind == IMG2IMG["want"][1],
            "kept_colour": colour == IMG2IMG["source"].colour, "iou": iou(foreground(out), foreground(src))}, out  # fmt: skip


def inpaint_case(pipe, seed: int, strength: float, guidance: float, steps: int) -> tuple[dict, np.ndarray]:
    src, mask = shapes.render(INPAINT["source"]), inpaint_mask()
    out = to_u8(pipe.generate(INPAINT["prompt"], image=src, mask_image=mask, strength=strength, guidance_scale=guidance,
                              steps=steps, seed=seed, output_type="np")[0])  # fmt: skip
    inside, outside = out.copy(), out.copy()
    inside[mask == 0] = shapes.COLOURS[BACKGROUND]  # the classifier reads the repainted region alone...
    outside[mask != 0] = shapes.COLOURS[BACKGROUND]  # ...and the kept region alone
    colour, kind = shapes.classify(inside)
    want = foreground(shapes.render(INPAINT["target"]))
    keep = mask == 0
    return {
        "colour": colour == INPAINT["target"].colour,
        "shape": kind == INPAINT["target"].shape,
        "kept_colour": shapes.classify(outside)[0] == INPAINT["source"].colour,  # its kind: the VAE rounds a small square's corners
        "iou": iou(foreground(inside), want),
        "outside_change": float(np.abs(out.astype(np.float32) - src)[keep].mean()),  # 0-255
    }, out


def vae_round_trip_change(pipe, seed: int) -> float:
    """Mean change outside the mask of decode(encode(input)) alone, the latent sample drawn as
    inpainting draws it: what any latent-space inpainting leaves outside without a paste-back."""
    src, keep = shapes.render(INPAINT["source"]), inpaint_mask() == 0
    x = torch.from_numpy(src.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]  # [1, 3, H, W]
    latents = pipe.image_latents(x, torch.Generator().manual_seed(seed))
    out = to_u8(pipe.decode(latents)[0])
    return float(np.abs(out.astype(np.float32) - src)[keep].mean())


def measure(pipe, seeds: int, mode: str, strength: float, guidance: float, steps: int = 25) -> tuple[dict, list]:
    """({figure: value}, [uint8 images]) of one operating point over seeds 0..seeds-1: rates of
    the asked colour / shape (and of the input's colour kept), median IoU, median change outside."""
    case = img2img_case if mode == "img2img" else inpaint_case
    rows = [case(pipe, s, strength, guidance, steps) for s in range(seeds)]
    figures = {"mode": mode, "strength": strength, "guidance": guidance, "steps": steps, "seeds": seeds}
    for k in rows[0][0]:
        values = [r[k] for r, _ in rows]
        figures[k] = float(np.mean(values)) if isinstance(values[0], bool) else float(statistics.median(values))
    if mode == "inpaint":
        figures["vae_round_trip_change"] = float(statistics.median(vae_round_trip_change(pipe, s) for s in range(seeds)))
    return figures, [im for _, im in rows]


def format_table(results: list[dict]) -> str:
    cols = ("colour", "shape", "kept_colour", "iou", "outside_change", "vae_round_trip_change")
    lines = ["mode     strength guidance " + " ".join(f"{c:>22}" for c in cols)]
    for r in results:
        cells = " ".join(f"{r[c]:>22.2f}" if c in r else f"{'':>22}" for c in cols)
        lines.append(f"{r['mode']:8} {r['strength']:8} {r['guidance']:8} {cells}")
    return "\n".join(lines)


def save_picture(path: Path, results: list[dict], images: list[list], columns: int = 4, zoom: int = 3) -> None:
    """One row per operating point: input | mask (white for img2img) | outputs of seeds 0.."""
    from PIL import Image

    mask = np.repeat(inpaint_mask()[:, :, None], 3, axis=2)
    rows = []
    for r, ims in zip(results, images):
        inpaint = r["mode"] == "inpaint"
        src = shapes.render(INPAINT["source"] if inpaint else IMG2IMG["source"])
        rows.append(np.concatenate([src, mask if inpaint else np.full_like(mask, 255), *ims[:columns]], axis=1))
    grid = np.concatenate(rows, axis=0)  # [points * 64, (2 + columns) * 64, 3]
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for edit_quality.json and edit_quality.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastdiff.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(testing.TINY_SHAPES, backend=args.backend)
    measured = [measure(pipe, args.seeds, *point, steps=args.steps) for point in POINTS]
    results = [r for r, _ in measured]
    print(f"tiny-shapes, {pipe.backend.name} {pipe.dtype}, {args.steps} steps dpmpp_2m, {args.seeds} seeds, {testing.cpu_name()}")
    print(format_table(results))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"backend": pipe.backend.name, "dtype": str(pipe.dtype), "cpu": testing.cpu_name()}
        (args.out / "edit_quality.json").write_text(json.dumps({**meta, "points": results}, indent=2) + "\n")
        save_picture(args.out / "edit_quality.png", results, [ims for _, ims in measured])
        print(f"wrote {args.out}/edit_quality.json and edit_quality.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
