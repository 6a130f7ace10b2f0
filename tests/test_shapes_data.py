"""The tiny-shapes data set: the pixel classifier reads rendered scenes back, and the held-out
split keeps whole (shape, colour, background) triples out of training but no single attribute or pair."""

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import shapes  # noqa: E402


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


def test_classifier_rejects_wrong_answers():
    """A blank background has no shape, and a square is not read as a circle."""
    blank = np.full((64, 64, 3), shapes.COLOURS["blue"], np.uint8)
    assert shapes.classify(blank) == (None, None)
    sq = shapes.render(shapes.Scene("square", "red", "blue", "large", "center"))
    assert shapes.classify(sq) == ("red", "square")


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
