"""End-to-end parity: fastdiff's Pipeline against diffusers' StableDiffusionPipeline on the same
folder, seed and settings (CPU, fp32), plus argument checking and thread safety."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import schedulers, testing
from fastdiff.pipeline import Pipeline

PROMPTS = ["a red circle on the left", "a photo of a cat, 4k, highly detailed"]
NEGATIVES = ["blurry", "low quality, jpeg artifacts"]
H, W = 32, 48  # non-square; the tiny VAE downsamples by 2


@pytest.fixture(scope="module", params=["a", "b"])
def model(request, tmp_path_factory):
    folder = testing.build_random_folder(tmp_path_factory.mktemp(f"sd-{request.param}"), request.param, seed=ord(request.param), sd15_layout=False)
    return request.param, folder


@pytest.fixture(scope="module")
def pipes(model):
    from diffusers import StableDiffusionPipeline

    _, folder = model
    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    ref.original_scheduler_config = ref.scheduler.config  # each test swaps schedulers from this one
    return ref, ours


def _diffusers_scheduler(name, config):
    import diffusers

    entry = schedulers.REGISTRY[name]
    return getattr(diffusers, entry.diffusers_class).from_config(config, **entry.diffusers_config)


CASES = [
    (sched, steps, neg)
    for sched in schedulers.NAMES
    for steps, neg in ((3, False), (3, True), (8, False), (8, True))
]


@pytest.mark.parametrize("scheduler,steps,negative", CASES)
def test_matches_diffusers(pipes, scheduler, steps, negative):
    ref, ours = pipes
    seed = int(torch.randint(0, 2**31, ()).item())
    ref.scheduler = _diffusers_scheduler(scheduler, ref.original_scheduler_config)
    kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, height=H, width=W, output_type="np")
    expected = ref(
        prompt=PROMPTS,
        negative_prompt=NEGATIVES if negative else None,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
    ).images
    got = ours.generate(
        PROMPTS,
        negative_prompt=NEGATIVES if negative else None,
        steps=steps,
        guidance_scale=7.5,
        height=H,
        width=W,
        seed=seed,
        scheduler=scheduler,
        output_type="np",
    )
    assert got.shape == expected.shape == (2, H, W, 3)
    assert got.dtype == np.float32
    err = np.abs(got - expected).max()
    assert err <= 1e-4, f"{scheduler} {steps} steps, seed {seed}: max abs {err:.2e}"
    assert expected.std() > 1e-3, f"seed {seed}"  # a flat image would make the comparison meaningless


def test_image_latents_match_diffusers(pipes):
    """img2img's start: the encoder's Gaussian sampled as diffusers' latent_dist.sample(generator)
    draws it, times the scaling factor; batch 2, non-square, a fresh seed."""
    ref, ours = pipes
    seed = int(torch.randint(0, 2**31, ()).item())
    image = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    with torch.no_grad():
        dist = ref.vae.encode(image).latent_dist
        want = dist.sample(torch.Generator().manual_seed(seed + 1)) * ref.vae.config.scaling_factor
    got = ours.image_latents(image, torch.Generator().manual_seed(seed + 1))
    assert got.shape == want.shape == (2, 4, H // 2, W // 2)
    assert (got - want).abs().max().item() <= 1e-5, f"seed {seed}"
    assert dist.std.min() < 1  # the sample is not just the mean: the draw itself is compared
    other = ours.image_latents(image, torch.Generator().manual_seed(seed + 2))
    assert (other - want).abs().max().item() > 1e-3


def test_image_latents_need_an_encoder(pipes):
    _, ours = pipes
    backend = type("NoEncoder", (), {"name": "fake", "encodes_images": False})()
    fake = copy.copy(ours)
    fake.backend = backend
    with pytest.raises(ValueError, match="backend='fake' has no VAE encoder"):
        fake.image_latents(torch.zeros(1, 3, H, W), torch.Generator())


def test_num_images_and_no_guidance(pipes):
    ref, ours = pipes
    ref.scheduler = _diffusers_scheduler("dpmpp_2m", ref.original_scheduler_config)
    for guidance in (1.0, 5.0):
        expected = ref(
            prompt=PROMPTS,
            num_inference_steps=4,
            guidance_scale=guidance,
            height=H,
            width=W,
            num_images_per_prompt=2,
            generator=torch.Generator("cpu").manual_seed(7),
            output_type="np",
        ).images
        got = ours.generate(
            PROMPTS, steps=4, guidance_scale=guidance, height=H, width=W, num_images=2, seed=7, output_type="np"
        )
        assert got.shape == (4, H, W, 3)
        assert np.abs(got - expected).max() <= 1e-4


def test_output_types(pipes):
    _, ours = pipes
    im = ours.generate("a cat", steps=2, height=H, width=W, seed=3)
    assert im.size == (W, H) and im.mode == "RGB"
    arr = ours.generate("a cat", steps=2, height=H, width=W, seed=3, output_type="np")
    assert np.array_equal(np.asarray(im), (arr[0] * 255).round().astype(np.uint8))
    ims = ours.generate(["a", "b"], steps=2, height=H, width=W, seed=3)
    assert isinstance(ims, list) and len(ims) == 2


def test_empty_prompt_is_unconditional(pipes):
    ref, ours = pipes
    ref.scheduler = _diffusers_scheduler("ddim", ref.original_scheduler_config)
    expected = ref(
        prompt="", num_inference_steps=3, height=H, width=W, generator=torch.Generator("cpu").manual_seed(1), output_type="np"
    ).images
    got = ours.generate("", steps=3, height=H, width=W, seed=1, scheduler="ddim", output_type="np")
    assert np.abs(got - expected).max() <= 1e-4


def test_threads(pipes):
    """Four threads at once give exactly what the same calls give one after another."""
    _, ours = pipes
    seeds = [11, 12, 13, 14]
    serial = [ours.generate(PROMPTS[0], steps=3, height=H, width=W, seed=s, output_type="np") for s in seeds]
    out = [None] * 4
    errors = []

    def work(k):
        try:
            out[k] = ours.generate(PROMPTS[0], steps=3, height=H, width=W, seed=seeds[k], output_type="np")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for a, b in zip(serial, out):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(serial[0], serial[1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=33), "height"),
        (dict(width=0), "width"),
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-1.0), "guidance_scale"),
        (dict(scheduler="lms"), "scheduler"),
        (dict(backend="cuda-magic"), "backend"),
        (dict(output_type="tensor"), "output_type"),
        (dict(num_images=0), "num_images"),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt"),
        (dict(prompt=[]), "prompt"),
    ],
)
def test_bad_arguments_fail_before_model_work(kwargs, match, monkeypatch):
    """Each bad argument is a ValueError naming it, raised before any model is resolved or loaded."""
    import fastdiff.pipeline as P

    def boom(*a, **k):
        raise AssertionError("model work started before argument checks")

    monkeypatch.setattr(P, "resolve_model", boom)
    monkeypatch.setattr(P.Pipeline, "from_pretrained", boom)
    args = dict(prompt="a cat")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastdiff.generate(args.pop("prompt"), **args)


def test_generate_caches_pipeline(model, monkeypatch):
    import fastdiff.pipeline as P

    _, folder = model
    loads = []
    real = P.Pipeline.from_pretrained.__func__

    def counting(cls, *a, **k):
        loads.append(a)
        return real(cls, *a, **k)

    monkeypatch.setattr(P.Pipeline, "from_pretrained", classmethod(counting))
    monkeypatch.setattr(P, "_cache", {})
    a = fastdiff.generate("x", model=folder, backend="torch", steps=2, height=H, width=W, seed=5, output_type="np")
    b = fastdiff.generate("x", model=folder, backend="torch", steps=2, height=H, width=W, seed=5, output_type="np")
    assert len(loads) == 1
    np.testing.assert_array_equal(a, b)


def test_import_is_cheap():
    """`import fastdiff` (and the pipeline module) builds no model and imports no diffusers/transformers."""
    import subprocess
    import sys

    code = (
        "import sys, fastdiff\n"
        "assert 'torch' not in sys.modules, 'import fastdiff pulled in torch'\n"
        "import fastdiff.pipeline\n"
        "bad = [m for m in ('diffusers', 'transformers', 'onnx', 'onnxruntime', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
