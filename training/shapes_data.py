"""A procedural captioned image data set for the embedded "tiny-shapes" model.

Each 64x64 RGB scene holds one flat-coloured shape (circle, square or triangle) of a named colour
and size, at a named horizontal position, on a flat coloured background, with a caption such as
"a small red circle on the left on a blue background" (or a shorter variant). Everything is
rendered in code (PIL, 4x supersampled for smooth edges), so the set costs no download.

A deterministic held-out split keeps some (shape, colour, background) triples out of training
while every single attribute and every pair of them still appears; `heldout_prompts()` lists
prompts for those triples, and `classify()` is a pixel classifier (no model) that reads the
colour and shape back from a generated picture, to measure prompt adherence.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # image side, pixels
SUPER = 4  # supersampling factor used when drawing

# Named colours, chosen far apart in RGB. Foreground colours are also backgrounds; black and
# gray are backgrounds only.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
FG_COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
BG_COLOURS = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 20, "large": 34}  # nominal bounding-box side, pixels
POSITIONS = {"left": 18, "center": 32, "right": 46}  # nominal centre x, pixels


@dataclass(frozen=True)
class Scene:
    """One scene's attributes; `dx`, `dy`, `ds` are the pixel jitters of centre and size."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    dx: int = 0
    dy: int = 0
    ds: int = 0


def is_heldout(shape: str, colour: str, background: str) -> bool:
    """True for the (shape, colour, background) triples never trained on.

    The rule (s + 2c + 3b) % 7 == 0 over the attribute indices picks ~1/7 of the triples; for a
    fixed pair at most one or two values of the third attribute are picked, so every pair keeps
    training examples (tests/test_shapes_data.py checks this).
    """
    s, c, b = SHAPES.index(shape), FG_COLOURS.index(colour), BG_COLOURS.index(background)
    return (s + 2 * c + 3 * b) % 7 == 0


def all_triples() -> list[tuple[str, str, str]]:
    """Every valid (shape, colour, background) triple (the colour differs from the background)."""
    return [(s, c, b) for s, c, b in itertools.product(SHAPES, FG_COLOURS, BG_COLOURS) if c != b]


def train_triples() -> list[tuple[str, str, str]]:
    return [t for t in all_triples() if not is_heldout(*t)]


def heldout_triples() -> list[tuple[str, str, str]]:
    return [t for t in all_triples() if is_heldout(*t)]


def heldout_prompts() -> list[tuple[str, Scene]]:
    """Prompts for the held-out triples: (caption, scene it asks for), two sizes each."""
    out = []
    for shape, colour, bg in heldout_triples():
        for size in SIZES:
            scene = Scene(shape, colour, bg, size, "center")
            out.append((f"a {size} {colour} {shape} on a {bg} background", scene))
    return out


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """The caption of a scene; with `rng`, a random shorter variant (size, position and
    background each mentioned or not), otherwise the full caption."""
    keep_size = keep_pos = keep_bg = True
    if rng is not None:
        keep_size, keep_pos = rng.random() < 0.6, rng.random() < 0.6
        keep_bg = rng.random() < 0.85
    words = ["a"] + ([scene.size] if keep_size else []) + [scene.colour, scene.shape]
    if keep_pos:
        words += ["in the center"] if scene.position == "center" else [f"on the {scene.position}"]
    if keep_bg:
        words += [f"on a {scene.background} background"]
    return " ".join(words)


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: uint8 array [64, 64, 3]."""
    big = SIZE * SUPER
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    side = (SIZES[scene.size] + scene.ds) * SUPER
    cx = (POSITIONS[scene.position] + scene.dx) * SUPER
    cy = (SIZE // 2 + scene.dy) * SUPER
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX))


def random_scene(rng: np.random.Generator, triples: list[tuple[str, str, str]] | None = None) -> Scene:
    """A random scene whose (shape, colour, background) comes from `triples` (default: training)."""
    triples = triples or train_triples()
    shape, colour, bg = triples[rng.integers(len(triples))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    jit = 3 if size == "small" else 2  # large shapes have less room to move
    return Scene(
        shape, colour, bg, size, position,
        dx=int(rng.integers(-jit, jit + 1)), dy=int(rng.integers(-jit, jit + 1)), ds=int(rng.integers(-2, 3)),
    )


def make_dataset(n: int, seed: int, triples: list[tuple[str, str, str]] | None = None):
    """Render `n` random scenes: (uint8 images [n, 64, 64, 3], list of Scene)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, triples) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


# ---------------------------------------------------------------------------------------------
# Pixel classifier: reads the colour and the shape back from a picture, no model involved.

FG_THRESHOLD = 60.0  # RGB distance from the background above which a pixel is foreground
TRIANGLE_TAPER = 0.6  # top-third / bottom-third width below which a shape is a triangle
SQUARE_FILL = 0.89  # bounding-box fill ratio above which a shape is a square (circle pi/4 ~ 0.785)


def classify(image: np.ndarray) -> tuple[str | None, str | None]:
    """(foreground colour, shape kind) of a 64x64 RGB uint8 image; (None, None) if empty.

    The background is the median of the 2-pixel border; pixels differing from it by more than
    FG_THRESHOLD are foreground, and their majority nearest named colour is the colour. The
    outline is the iso-line half-way between the background and the shape's own colour (the
    median of the most distinct quarter of the foreground): a fixed threshold would put a soft
    edge's outline at a contrast-dependent place. Inside the outline's bounding box (1st..99th
    percentile of its coordinates, so a few stray pixels do not stretch it) the kind is read from
    two numbers a soft edge barely moves: an upright triangle's top third is much narrower than
    its bottom third (width ratio 0.2; circle and square 1.0), and a square fills its corners
    (fill ratio 1.0 vs a circle's pi/4).
    """
    img = image.astype(np.float32)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)  # [H, W]
    coarse = dist > FG_THRESHOLD
    if coarse.sum() < 12:
        return None, None
    pixels = img[coarse]  # [n, 3]
    palette = np.array([COLOURS[c] for c in FG_COLOURS], dtype=np.float32)  # [k, 3]
    nearest = np.linalg.norm(pixels[:, None] - palette[None], axis=-1).argmin(1)
    colour = FG_COLOURS[np.bincount(nearest, minlength=len(FG_COLOURS)).argmax()]

    inner = dist >= np.percentile(dist[coarse], 75)
    contrast = np.linalg.norm(np.median(img[inner], axis=0) - bg)
    mask = dist > max(FG_THRESHOLD, 0.5 * contrast)
    ys, xs = np.nonzero(mask)
    if len(ys) < 12:
        return colour, None
    y0, y1 = np.round(np.percentile(ys, [1, 99])).astype(int)
    x0, x1 = np.round(np.percentile(xs, [1, 99])).astype(int)
    crop = mask[y0:y1 + 1, x0:x1 + 1]  # [h, w]
    third = max(1, crop.shape[0] // 3)
    taper = crop[:third].sum(1).mean() / max(crop[-third:].sum(1).mean(), 1)
    if taper < TRIANGLE_TAPER:
        return colour, "triangle"
    return colour, "square" if crop.mean() > SQUARE_FILL else "circle"
