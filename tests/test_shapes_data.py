"""The tiny-shapes data set: the pixel classifier reads rendered scenes back, and the held-out
split keeps whole (shape, colour, background) triples out of training but no single attribute or pair."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from fastdiff import testing

shapes = testing.load_script(Path(__file__).resolve().parents[1] / "training" / "shapes_data.py")


@pytest.mark.parametrize("triples", ["train", "heldout"])
def test_classifier_on_ground_truth(triples):
    seed = int(np.random.SeedSequence().entropy % 2**31)  # fresh scenes each run
    pool = shapes.train_triples() if triples == "train" else shapes.heldout_triples()
    images, scenes = shapes.make_dataset(300, seed=seed, triples=pool)
    found = [shapes.classify(im) for im in images]
    colour_acc = np.mean([c == s.colour for (c, _), s in zip(found, scenes)])
    shape_acc = np.mean([k == s.shape for (_, k), s in zip(found, scenes)])
    assert colour_acc >= 0.98, (seed, colour_acc)
    assert shape_acc >= 0.95, (seed, shape_acc)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of uint8 [N, H, W, 3] images (edges replicated)."""
    import torch
    import torch.nn.functional as F

    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    k /= k.sum()
    n, h, w, _ = images.shape
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().reshape(-1, 1, h, w)  # [N*3, 1, H, W]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return x.reshape(n, 3, h, w).permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()


def test_classifier_on_soft_edges():
    """A decoded picture has soft edges: a blurred triangle is still a triangle (a fixed-threshold
    fill ratio read 1.5-px-blurred triangles as circles), and a blurred circle still a circle."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    images, scenes = shapes.make_dataset(200, seed=seed)
    found = [shapes.classify(im) for im in _blur(images, 1.5)]
    shape_acc = np.mean([k == s.shape for (_, k), s in zip(found, scenes)])
    colour_acc = np.mean([c == s.colour for (c, _), s in zip(found, scenes)])
    assert shape_acc >= 0.97 and colour_acc >= 0.97, (seed, shape_acc, colour_acc)


def test_classifier_rejects_wrong_answers():
    """A blank background has no shape, and a square is not read as a circle."""
    blank = np.full((64, 64, 3), shapes.COLOURS["blue"], np.uint8)
    assert shapes.classify(blank) == (None, None)
    for kind in shapes.SHAPES:  # each kind is read as itself, not as one of the others
        im = shapes.render(shapes.Scene(kind, "red", "blue", "large", "center"))
        assert shapes.classify(im) == ("red", kind)
    # A disc with a wide soft rim (as a decoder draws it) is a circle, never a square or triangle.
    yy, xx = np.mgrid[:64, :64]
    blob = np.clip((11 - np.hypot(yy - 30, xx - 34)) / 4, 0, 1)[..., None]  # [64, 64, 1]
    img = (blob * np.array(shapes.COLOURS["yellow"]) + (1 - blob) * np.array(shapes.COLOURS["black"]))
    assert shapes.classify(img.round().astype(np.uint8)) == ("yellow", "circle")


def test_split_holds_triples_out_but_keeps_pairs():
    train, held = set(shapes.train_triples()), set(shapes.heldout_triples())
    assert held and not (train & held)
    assert train | held == set(shapes.all_triples())
    for i, j in itertools.combinations(range(3), 2):  # every pair of attributes seen in training
        pairs_all = {(t[i], t[j]) for t in shapes.all_triples()}
        pairs_train = {(t[i], t[j]) for t in train}
        assert pairs_all == pairs_train, (i, j, pairs_all - pairs_train)
    assert len(shapes.heldout_prompts()) >= 32


def test_training_data_never_contains_heldout():
    _, scenes = shapes.make_dataset(2000, seed=1)
    assert not any(shapes.is_heldout(s.shape, s.colour, s.background) for s in scenes)
