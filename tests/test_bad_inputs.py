"""Nothing silently wrong: every bad input is an error that names the argument or the file, raised
before the model work it would waste; a result with NaN/inf is an error, never a black image.

Tables of cases, each run against the embedded model (or a damaged copy of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import fastdiff
import fastdiff.pipeline as P
from fastdiff.pipeline import NonFiniteError, Pipeline
from fastdiff.weights import ModelFileError, resolve_model

MODEL = resolve_model("tiny-shapes")
RUN = dict(steps=2, seed=0, output_type="np")


def no_model_work(monkeypatch, *, allow_resolve: bool = False):
    def boom(*a, **k):
        raise AssertionError("model work started before the arguments were checked")

    if not allow_resolve:
        monkeypatch.setattr(P, "resolve_model", boom)
    monkeypatch.setattr(P.Pipeline, "from_pretrained", boom)
    monkeypatch.setattr(P, "_cache", {})


# (keyword arguments of generate(), what the message must name)
ARGUMENTS = [
    (dict(prompt=None), "prompt"),
    (dict(prompt=123), "prompt"),
    (dict(prompt={"a": 1}), "prompt"),
    (dict(prompt=("ok", 3)), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt="a \ud800 cat"), "prompt"),  # a lone surrogate: no text encoder can take it
    (dict(negative_prompt=7), "negative_prompt"),
    (dict(negative_prompt="\udfff"), "negative_prompt"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
    (dict(seed="abc"), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=True), "seed"),
    (dict(guidance_scale="7"), "guidance_scale"),
    (dict(guidance_scale=float("inf")), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=None), "guidance_scale"),
    (dict(steps=0), "steps"),
    (dict(steps=4.0), "steps"),
    (dict(steps=True), "steps"),
    (dict(steps="4"), "steps"),
    (dict(steps=10_000), "FASTDIFF_MAX_STEPS"),
    (dict(num_images=0), "num_images"),
    (dict(num_images=True), "num_images"),
    (dict(num_images=2.0), "num_images"),
    (dict(num_images=10**6, height=64, width=64), "FASTDIFF_MAX_BATCH_PIXELS"),
    (dict(prompt=["a"] * 17, height=512, width=512), "FASTDIFF_MAX_BATCH_PIXELS"),
    (dict(height=100_000, width=512), "FASTDIFF_MAX_PIXELS"),
    (dict(height=33), "height"),
    (dict(height="64"), "height"),
    (dict(width=64.0), "width"),
    (dict(width=0), "width"),
    (dict(scheduler="lms"), "scheduler"),
    (dict(backend="cuda-magic"), "backend"),
    (dict(output_type="tensor"), "output_type"),
]


@pytest.mark.parametrize("kwargs,names", ARGUMENTS, ids=[f"{k}" for k, _ in ARGUMENTS])
def test_bad_argument_is_named_before_model_work(kwargs, names, monkeypatch):
    no_model_work(monkeypatch)
    args = dict(prompt="a cat", **RUN)
    args.update(kwargs)
    with pytest.raises(ValueError, match=names):
        fastdiff.generate(args.pop("prompt"), **args)


# The model's own rules: a scheduler's step range (from its timestep spacing), and the default
# size against the per-call pixel limit, before any load.
STEP_RANGES = [
    (dict(num_images=10**6), r"num_images: 1000000 images of 64x64 .*FASTDIFF_MAX_BATCH_PIXELS"),
    (dict(scheduler="ddim", steps=1000), r"steps=1000: ddim .* 1 to 999 steps"),
    (dict(scheduler="pndm", steps=1000), r"steps=1000: pndm .* 1 to 999 steps"),
    (dict(scheduler="pndm", steps=1001), r"steps=1001: pndm"),
    (dict(scheduler="dpmpp_2m", steps=1000), r"steps=1000: dpmpp_2m .* 1 to 999 steps"),
]


@pytest.mark.parametrize("kwargs,message", STEP_RANGES, ids=[f"{k}" for k, _ in STEP_RANGES])
def test_model_rules_are_checked_before_loading(kwargs, message, monkeypatch):
    no_model_work(monkeypatch, allow_resolve=True)
    monkeypatch.setenv("FASTDIFF_MAX_STEPS", "100000")  # the scheduler's range, not the general cap
    with pytest.raises(ValueError, match=message):
        fastdiff.generate("a cat", model=MODEL, **{**RUN, **kwargs})


def test_limits_come_from_the_environment_or_the_pipeline(monkeypatch):
    no_model_work(monkeypatch)
    monkeypatch.setenv("FASTDIFF_MAX_STEPS", "3")
    with pytest.raises(ValueError, match=r"steps=4: over the limit of 3 .*FASTDIFF_MAX_STEPS"):
        fastdiff.generate("a cat", **{**RUN, "steps": 4})
    monkeypatch.setenv("FASTDIFF_MAX_STEPS", "many")
    with pytest.raises(ValueError, match="FASTDIFF_MAX_STEPS='many'"):
        fastdiff.generate("a cat", **RUN)
    monkeypatch.delenv("FASTDIFF_MAX_STEPS")
    pipe = Pipeline.__new__(Pipeline)  # only the limits are read before model work
    pipe.limits = P.Limits(max_batch_pixels=64 * 64)
    with pytest.raises(ValueError, match=r"num_images: 2 images of 64x64 in one call are 8192 pixels, over the limit of 4096"):
        Pipeline.run(pipe, "a cat", num_images=2, height=64, width=64, **RUN)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(MODEL, backend="torch")


def test_numpy_integers_are_integers(pipe):
    got = pipe.generate("a red circle", steps=np.int64(2), height=np.int32(64), width=np.int64(64),
                        seed=np.uint64(3), num_images=np.int8(1), guidance_scale=np.float32(7.5), output_type="np")
    want = pipe.generate("a red circle", steps=2, height=64, width=64, seed=3, num_images=1, output_type="np")
    np.testing.assert_array_equal(got, want)


def test_huge_guidance_is_an_error_not_a_black_image(pipe):
    with pytest.raises(NonFiniteError, match=r"denoising loop .* step [12] of 2 .*guidance_scale=1e\+30"):
        pipe.generate("a red circle", guidance_scale=1e30, **RUN)


# ----------------------------------------------------------------------------------------------
# Damaged model folders: each error names the file (and poisoned weights name the tensor).


def poison(folder: Path, component: str, file: str, key_part: str) -> str:
    """Set one weight tensor whose name contains `key_part` to NaN; returns its name."""
    path = folder / component / file
    state = safetensors.torch.load_file(path)
    key = sorted(k for k in state if key_part in k)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})
    return key


NAN_WEIGHTS = [  # (component, weights file, a tensor to poison, the network the error names)
    ("text_encoder", "model.safetensors", "final_layer_norm.weight", "text encoder"),
    ("unet", "diffusion_pytorch_model.safetensors", "conv_in.weight", "denoising loop"),
    ("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_out.weight", "VAE decode"),
]


@pytest.mark.parametrize("component,file,key_part,stage", NAN_WEIGHTS, ids=[c for c, *_ in NAN_WEIGHTS])
def test_nan_weights_are_an_error_naming_the_tensor(component, file, key_part, stage, tmp_path):
    folder = shutil.copytree(MODEL, tmp_path / "model")
    key = poison(folder, component, file, key_part)
    pipe = Pipeline.from_pretrained(folder, backend="torch")
    with pytest.raises(NonFiniteError, match=stage) as e:
        pipe.generate("a red circle", **RUN)
    stripped = key.removeprefix("text_model.")  # the module's name for the checkpoint's key
    assert stripped in str(e.value) or key in str(e.value), str(e.value)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng().bytes(4096))


def bad_json(path: Path) -> None:
    path.write_text('{"sample_size": 16,')


def json_list(path: Path) -> None:
    path.write_text(json.dumps([1, 2, 3]))


# (file, damage, raised before any weights are read)
DAMAGED_FILES = [
    ("unet/diffusion_pytorch_model.safetensors", truncate, False),
    ("vae/diffusion_pytorch_model.safetensors", random_bytes, False),
    ("text_encoder/model.safetensors", truncate, False),
    ("model_index.json", bad_json, True),
    ("scheduler/scheduler_config.json", bad_json, True),
    ("unet/config.json", bad_json, True),
    ("vae/config.json", json_list, True),
    ("text_encoder/config.json", json_list, False),
    ("tokenizer/vocab.json", random_bytes, True),
    ("tokenizer/tokenizer_config.json", bad_json, True),
]


@pytest.mark.parametrize("file,damage,early", DAMAGED_FILES, ids=[f"{f}-{d.__name__}" for f, d, _ in DAMAGED_FILES])
def test_damaged_file_is_named(file, damage, early, tmp_path, monkeypatch):
    folder = shutil.copytree(MODEL, tmp_path / "model")
    damage(folder / file)
    if early:
        import fastdiff.backends.torch_backend as TB

        monkeypatch.setattr(TB, "load_module", lambda *a, **k: pytest.fail("weights loaded before the damaged file was found"))
    with pytest.raises(ModelFileError) as e:
        Pipeline.from_pretrained(folder, backend="torch")
    assert str(folder / file) in str(e.value)
    assert isinstance(e.value, ValueError)  # one except clause catches every bad input


def test_generate_signatures_stay_equal():
    """fastdiff.generate and Pipeline.generate forward their arguments by name to Pipeline.run:
    the three declare the same options, defaults and order (module: plus model and backend)."""
    import inspect

    from fastdiff import Pipeline, generate

    def params(fn, drop=()):
        return [(p.name, p.kind, p.default, p.annotation) for p in inspect.signature(fn).parameters.values()
                if p.name not in ("self", *drop)]  # fmt: skip

    run = params(Pipeline.run, ("timed",))
    assert params(Pipeline.generate) == run
    assert params(generate, ("model", "backend")) == run
