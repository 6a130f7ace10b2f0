"""`python -m fastdiff`: the image generate() makes, written whole; every error one line and a
non-zero exit (a traceback only with --debug), found before the model loads where it can be."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fastdiff


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "fastdiff", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_writes_the_image_generate_makes(tmp_path):
    proc = cli(tmp_path, "a red circle on a blue background", "-o", "out.png", "--steps", "3", "--seed", "4")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary file left beside it
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    want = np.asarray(fastdiff.generate("a red circle on a blue background", steps=3, seed=4), dtype=np.int16)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


# (arguments, exit status, what the one error line names, found before the model loads)
ERRORS = [
    (["x", "-o", "no-such-folder/out.png"], 2, "--output", True),
    (["x", "-o", "out.xyz"], 2, "extension", True),
    (["x", "-o", "."], 2, "--output", True),
    (["x", "--seed", "-1"], 2, "seed", True),
    (["x", "--steps", "1000", "--scheduler", "ddim"], 2, "steps=1000", True),
    (["x", "--model", "no-such-model"], 2, "no-such-model", True),
    (["x", "--guidance-scale", "1e30", "--steps", "2"], 1, "NonFiniteError", False),
    (["x", "--image", "no-such.png"], 2, "--image='no-such.png': no such file", True),
    (["x", "--image", "bad.png"], 2, "--image='bad.png': not a readable image", True),
    (["x", "--image", "in.png", "--mask", "bad.png"], 2, "--mask='bad.png': not a readable image", True),
    (["x", "--mask", "in.png"], 2, "mask_image: inpainting needs the image too", True),
    (["x", "--image", "in.png", "--strength", "0"], 2, "strength=0.0: must be a number in (0, 1]", True),
    (["x", "--image", "in.png", "--mask", "black.png"], 2, "mask_image is all black", True),
    (["x", "--lora", "no-such.safetensors"], 2, "no-such.safetensors: no such adapter file", True),
    (["x", "--lora", "in.png=strong"], 2, "--lora 'in.png=strong': give PATH or PATH=WEIGHT", True),
    (["x", "--lora", "bad.png"], 2, "bad.png: not a readable .safetensors adapter", True),
]


def _inputs(folder):
    """Inputs for the default model (64x64 px): in.png (a red square on grey), mask.png (white box on its right half), black.png, bad.png."""
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    img.paste((220, 30, 30), (10, 20, 34, 44))
    img.save(folder / "in.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 8, 60, 56))
    mask.save(folder / "mask.png")
    Image.new("L", (64, 64), 0).save(folder / "black.png")
    (folder / "bad.png").write_bytes(b"not an image")


@pytest.mark.parametrize("args,status,names,early", ERRORS, ids=[" ".join(a[1:]) for a, *_ in ERRORS])
def test_errors_are_one_line(tmp_path, args, status, names, early):
    _inputs(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli(tmp_path, *args)
    assert proc.returncode == status, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("fastdiff: loaded" in proc.stderr) != early, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("mask", [False, True], ids=["img2img", "inpaint"])
def test_image_and_mask_files(tmp_path, mask):
    """--image / --mask / --strength write the image generate() makes from the same files."""
    _inputs(tmp_path)
    extra = ["--mask", "mask.png"] if mask else []
    proc = cli(tmp_path, "a blue circle", "-o", "out.png", "--steps", "4", "--seed", "3", "--image", "in.png",
               "--strength", "0.9", *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "vae encode" in proc.stdout
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    edit = {"mask_image": str(tmp_path / "mask.png")} if mask else {}
    want = fastdiff.generate("a blue circle", steps=4, seed=3, image=str(tmp_path / "in.png"), strength=0.9, **edit)
    want = np.asarray(want, dtype=np.int16)
    assert got.shape == want.shape == (64, 64, 3) and np.abs(got - want).max() <= 1


def test_lora_option(tmp_path):
    """--lora PATH=WEIGHT writes the image generate(lora=) makes with the same adapter."""
    from pathlib import Path

    from fastdiff import testing

    bench = testing.load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "lora_swap.py")
    bench.write_adapter(testing.TINY_SHAPES, tmp_path / "style.safetensors", rank=4, seed=1, scale=0.3)
    proc = cli(tmp_path, "a red circle", "-o", "out.png", "--steps", "4", "--seed", "3", "--lora", "style.safetensors=0.5")
    assert proc.returncode == 0, proc.stderr
    got = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.int16)
    want = np.asarray(fastdiff.generate("a red circle", steps=4, seed=3, lora={tmp_path / "style.safetensors": 0.5}), dtype=np.int16)
    base = np.asarray(fastdiff.generate("a red circle", steps=4, seed=3), dtype=np.int16)
    assert np.abs(got - want).max() <= 1 and np.abs(want - base).max() > 10


def test_debug_shows_the_traceback(tmp_path):
    proc = cli(tmp_path, "x", "--guidance-scale", "1e30", "--steps", "2", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "NonFiniteError" in proc.stderr


def test_a_dtype_this_cpu_would_emulate_is_one_error_line(tmp_path):
    import torch

    from fastdiff import precision

    slow = [name for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)) if not precision.cpu_runs_fast(dtype)]
    if not slow:
        pytest.skip("this CPU runs both 16-bit dtypes natively")
    proc = cli(tmp_path, "x", "--dtype", slow[0], "--device", "cpu", "--steps", "2")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and f"dtype=torch.{slow[0]}: this CPU has no" in errors[0], proc.stderr
    assert "fastdiff: loaded" not in proc.stderr and not list(tmp_path.glob("*.png"))
