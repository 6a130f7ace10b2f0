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
]


@pytest.mark.parametrize("args,status,names,early", ERRORS, ids=[" ".join(a[1:]) for a, *_ in ERRORS])
def test_errors_are_one_line(tmp_path, args, status, names, early):
    proc = cli(tmp_path, *args)
    assert proc.returncode == status, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and names in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("fastdiff: loaded" in proc.stderr) != early, proc.stderr
    assert not list(tmp_path.glob("*.png"))


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
