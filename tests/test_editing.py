"""img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same folders, images, masks and seeds (CPU, fp32): every
scheduler, strength 0.3 / 0.75 / 1.0, with and without negative prompts, batch 2, non-square;
a 4-channel model (img2img, and inpainting by blending) and a 9-channel inpainting UNet; on the
torch backend and on onnxruntime (its exports of both models). Then the input checks, each a
ValueError naming the argument before any model work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff import editing, schedulers, testing
from fastdiff.pipeline import Pipeline

PROMPTS = ["a red circle on the left", "a photo of a cat, 4k, highly detailed"]
NEGATIVES = ["blurry", "low quality, jpeg artifacts"]
H, W = 32, 48  # non-square; the small VAEs downsample by 2
STEPS = 6
TOL = {"torch": 1e-4, "onnxruntime": 1e-3}  # as text to image (tests/test_pipeline.py, tests/test_ort_backend.py)


def random_image(seed: int, h: int = H, w: int = W) -> Image.Image:
    """A smooth random RGB picture (a flat one would hide a wrong image path)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, h // 8, w // 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")[0]  # [3, h, w]
    return Image.fromarray((big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def box_mask(h: int = H, w: int = W) -> Image.Image:
    """White (repaint) in a box off the centre, black elsewhere, one grey edge column binarised."""
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 : w - 4] = 255
    m[h // 4 : 3 * h // 4, w // 3 - 1] = 140  # >= 0.5: repaint
    m[h // 4 : 3 * h // 4, w // 3 - 2] = 110  # < 0.5: keep
    return Image.fromarray(m, mode="L")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model_a):
    """Model "a" (4-channel UNet; the run's shared one, whose export other files use too) and
    model "b" with a 9-channel inpainting UNet."""
    root = tmp_path_factory.mktemp("editing")
    return {"a": model_a, "b9": testing.build_random_folder(root / "b9", "b", seed=12, inpainting=True)}


@pytest.fixture(scope="module")
def ours(folders):
    return {k: Pipeline.from_pretrained(v, backend="torch", device="cpu") for k, v in folders.items()}


@pytest.fixture(scope="module")
def ours_ort(folders, shared_cache):
    """onnxruntime pipelines of both models, exported into the run's shared cache (model "a"'s
    export is the one the export and backend tests check)."""
    pytest.importorskip("onnxruntime")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(shared_cache))
        return {k: Pipeline.from_pretrained(v, backend="onnxruntime", device="cpu") for k, v in folders.items()}


@pytest.fixture(scope="module")
def reference(folders):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    refs = {
        ("img2img", "a"): StableDiffusionImg2ImgPipeline.from_pretrained(folders["a"], torch_dtype=torch.float32),
        ("inpaint", "a"): StableDiffusionInpaintPipeline.from_pretrained(folders["a"], torch_dtype=torch.float32),
        ("inpaint", "b9"): StableDiffusionInpaintPipeline.from_pretrained(folders["b9"], torch_dtype=torch.float32),
    }
    for r in refs.values():
        r.set_progress_bar_config(disable=True)
        r.original_scheduler_config = r.scheduler.config
    return refs


def _diffusers_scheduler(name, config):
    import diffusers

    entry = schedulers.REGISTRY[name]
    return getattr(diffusers, entry.diffusers_class).from_config(config, **entry.diffusers_config)


MODES = [("img2img", "a"), ("inpaint", "a"), ("inpaint", "b9")]
STRENGTHS = (0.3, 0.75, 1.0)
CASES = [
    (mode, model, name, strength, (i + j) % 2 == 1)  # negative prompts on every other case
    for i, (mode, model) in enumerate(MODES)
    for j, name in enumerate(schedulers.NAMES)
    for strength in STRENGTHS
]


def _compare(ref, pipe, mode, *, seed, scheduler="dpmpp_2m", strength=0.75, negative=False, prompts=PROMPTS,
             num_images=1, image=None, mask=None, size=None):
    ref.scheduler = _diffusers_scheduler(scheduler, ref.original_scheduler_config)
    image = image or random_image(seed)
    mask = mask or box_mask(image.height, image.width)
    edit = dict(image=image, mask_image=mask) if mode == "inpaint" else dict(image=image)
    h, w = size or (image.height, image.width)
    negatives = (NEGATIVES[: len(prompts)] if not isinstance(prompts, str) else NEGATIVES[0]) if negative else None
    sized = dict(height=h, width=w) if size or mode == "inpaint" else {}  # diffusers' inpaint defaults to the UNet's size
    ref_edit, ref_sized = edit, sized
    if mode == "img2img" and size:  # its img2img pipeline has no height / width: give it the image its processor would make
        ref_edit, ref_sized = dict(image=image.resize((w, h), Image.LANCZOS)), {}
    expected = ref(
        prompt=prompts, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=7.5, strength=strength,
        num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
        **ref_edit, **ref_sized,
    ).images  # fmt: skip
    got = pipe.generate(
        prompts, negative_prompt=negatives, steps=STEPS, guidance_scale=7.5, strength=strength, seed=seed,
        scheduler=scheduler, num_images=num_images, output_type="np", **edit, **({} if size is None else sized),
    )  # fmt: skip
    n = (1 if isinstance(prompts, str) else len(prompts)) * num_images
    assert got.shape == expected.shape == (n, h, w, 3)
    err = np.abs(got - expected).max()
    tol = TOL[pipe.backend.name]
    assert err <= tol, f"{pipe.backend.name} {mode} {scheduler} strength {strength}, seed {seed}: max abs {err:.2e}"
    assert expected.std() > 1e-3
    return got


@pytest.mark.parametrize("mode,model,scheduler,strength,negative", CASES)
def test_matches_diffusers(reference, ours, mode, model, scheduler, strength, negative):
    seed = int(torch.randint(0, 2**31, ()).item())
    _compare(reference[mode, model], ours[model], mode, seed=seed, scheduler=scheduler, strength=strength, negative=negative)


# onnxruntime runs the networks only (the scheduler and the editing math are the pipeline's, checked
# for every case above): each (mode, strength) once, every scheduler among them, negative prompts
# on every other case.
ORT_CASES = [
    (*MODES[i % len(MODES)], schedulers.NAMES[i % len(schedulers.NAMES)], STRENGTHS[i // len(MODES)], i % 2 == 1)
    for i in range(len(MODES) * len(STRENGTHS))
]


@pytest.mark.parametrize("mode,model,scheduler,strength,negative", ORT_CASES)
def test_onnxruntime_matches_diffusers(reference, ours_ort, mode, model, scheduler, strength, negative):
    seed = int(torch.randint(0, 2**31, ()).item())
    _compare(reference[mode, model], ours_ort[model], mode, seed=seed, scheduler=scheduler, strength=strength,
             negative=negative)  # fmt: skip


@pytest.mark.parametrize("mode,model", MODES)
def test_resize_and_num_images_match_diffusers(reference, ours, mode, model):
    """An image of another size resized to height x width (Lanczos, as diffusers), and one prompt
    with num_images=2 (one image latent draw serves both rows)."""
    seed = int(torch.randint(0, 2**31, ()).item())
    image = random_image(seed, 40, 56)
    _compare(reference[mode, model], ours[model], mode, seed=seed, image=image, size=(H, W), prompts=PROMPTS[0],
             num_images=2, scheduler="euler_a")  # fmt: skip


# What strength does to a picture is judged on the trained model (tests/test_tiny_shapes.py, img2img
# at 0.5 and 0.75): through a random model even strength 0.1 lands as far from the input as 1.0.
@pytest.mark.parametrize("kind", ["RGBA", "L", "uint8", "float", "path"])
def test_image_kinds(ours, tmp_path, kind):
    """RGBA (alpha dropped), grey (repeated), numpy uint8 and float arrays, and file paths give the
    RGB picture's output (grey: the grey picture's)."""
    pipe, rgb = ours["a"], random_image(5)
    if kind == "L":
        rgb = rgb.convert("L").convert("RGB")
    given = {
        "RGBA": random_image(5).convert("RGBA"),
        "L": random_image(5).convert("L"),
        "uint8": np.asarray(rgb),
        "float": np.asarray(rgb, np.float32) / 255,
        "path": tmp_path / "in.png",
    }[kind]
    if kind == "path":
        rgb.save(given)
    run = dict(steps=3, seed=2, strength=0.5, output_type="np")
    want = pipe.generate(PROMPTS[0], image=rgb, **run)
    got = pipe.generate(PROMPTS[0], image=given, **run)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_inpainting_keeps_the_outside_with_a_4_channel_unet(ours):
    """The blend puts the image's latents back outside the mask after the last step: the final
    latents there are exactly the encoded image's (its sampled latents, as diffusers')."""
    pipe = ours["a"]
    seen = {}
    real = pipe.decode

    def spy(latents):
        seen["latents"] = latents.clone()
        return real(latents)

    pipe.decode = spy
    try:
        image, mask = random_image(7), box_mask()
        pipe.generate(PROMPTS[0], image=image, mask_image=mask, steps=4, seed=9, output_type="np")
    finally:
        del pipe.decode
    edit = editing.read_inputs(image, mask, None, None, None, scale=2, multiple=2)
    known = pipe.image_latents(edit.image, torch.Generator().manual_seed(9))
    keep = edit.latent_mask[0, 0] == 0
    assert keep.any() and (~keep).any()
    torch.testing.assert_close(seen["latents"][0, :, keep], known[0, :, keep], rtol=0, atol=1e-6)
    assert (seen["latents"][0, :, ~keep] - known[0, :, ~keep]).abs().max() > 0.1


def test_graph_body_matches_the_loop(ours):
    """The captured step's body (run eagerly off CUDA on its static buffers, with a device step
    index) gives the eager loop's result for img2img and both inpainting kinds."""
    from fastdiff.graphs import GraphedStep, GraphKey

    for model, mask in (("a", None), ("a", box_mask()), ("b9", box_mask())):
        pipe = ours[model]
        for name in ("dpmpp_2m", "euler_a", "pndm"):
            edit = editing.read_inputs(random_image(4), mask, 0.6, None, None, scale=2, multiple=2)
            n = 2
            _, _, sched = fastdiff.pipeline.check_request(pipe.facts, pipe.limits, 7, None, None, name, n, pipe.backend, edit=edit)
            context = pipe.encode_prompt(PROMPTS, None, 1, True)
            latents, noise, inpaint = pipe.edit_latents(edit, torch.Generator().manual_seed(1), sched, n, True)
            want = pipe.denoise(sched, name, latents, context, 7.5, noise, inpaint)
            key = GraphKey(tuple(latents.shape), tuple(context.shape), name, sched.karras, 7, sched.start,
                           inpaint.kind if inpaint else "", True, pipe.dtype, "torch")  # fmt: skip
            step = GraphedStep(key, sched, pipe.backend.unet, pipe.device, inpaint)
            got = step.run(latents, context, 7.5, noise, inpaint)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument, before any model work.

def _solid(value: int, h=H, w=W, mode="L"):
    return Image.new(mode, (w, h), value)


BAD = [
    (dict(image=random_image(0), strength=0.0), r"strength=0\.0: must be a number in \(0, 1\]"),
    (dict(image=random_image(0), strength=1.5), r"strength=1\.5"),
    (dict(image=random_image(0), strength="0.5"), r"strength='0\.5'"),
    (dict(strength=0.5), r"strength=0\.5: applies to img2img and inpainting only"),
    (dict(image=random_image(0), strength=0.1, steps=5), r"strength=0\.1 with steps=5 leaves no step"),
    (dict(mask_image=box_mask()), r"mask_image: inpainting needs the image too"),
    (dict(image=random_image(0), mask_image=box_mask(16, 16)), r"mask_image is 16x16 px, image is 48x32"),
    (dict(image=random_image(0, 35, 48)), r"image: its height 35 px is not a multiple of 2 px"),
    (dict(image=random_image(0), height=35), r"height=35"),
    (dict(image=random_image(0), mask_image=_solid(0)), r"mask_image is all black"),
    (dict(image=random_image(0), mask_image=_solid(100)), r"mask_image is all black"),
    (dict(image="/no/such/file.png"), r"image='/no/such/file.png': no such file"),
    (dict(image=np.zeros((H, W, 2), np.uint8)), r"image: a numpy image must be \[H, W\] or \[H, W, C\]"),
    (dict(image=np.full((H, W, 3), 2.0)), r"image: a float numpy image must hold values in \[0, 1\]"),
    (dict(image=[random_image(0)]), r"image: got a list"),
    (dict(image=np.zeros((2048, 1024, 3), np.uint8)), r"image: 1024x2048 px is over the limit of 1048576 pixels"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_edit_inputs_fail_before_model_work(kwargs, match, monkeypatch, folders):
    """Through the one-call API, on a model not loaded yet: the ValueError comes before any load."""
    import fastdiff.pipeline as P

    folder = folders["a"]

    def boom(*a, **k):
        raise AssertionError("model work started before the input checks")

    monkeypatch.setattr(P.Pipeline, "from_pretrained", boom)
    monkeypatch.setattr(P, "_cache", {})
    with pytest.raises(ValueError, match=match):
        fastdiff.generate("a cat", model=folder, backend="torch", **{"steps": 10, **kwargs})


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image='.*broken\.png': not a readable image"):
        editing.read_inputs(str(bad), None, None, None, None, scale=8, multiple=8)


def test_tiny_mask_that_misses_every_latent_cell(ours):
    """A white mask region between latent sample points would repaint nothing: named, not run."""
    m = np.zeros((H, W), np.uint8)
    m[5, 5] = 255  # nearest resizing to 16x24 samples even rows and columns only
    with pytest.raises(ValueError, match="mask_image: its white region misses every 2x2 px latent cell"):
        ours["a"].generate("x", image=random_image(0), mask_image=m, steps=2)


def test_inpainting_model_needs_a_mask(ours):
    pipe = ours["b9"]
    for kwargs in ({}, {"image": random_image(0)}):
        with pytest.raises(ValueError, match=r"mask_image: .* is an inpainting model \(a 9-channel UNet\)"):
            pipe.generate("x", steps=2, **kwargs)


def test_backend_without_encoder_is_named_before_model_work(ours, monkeypatch):
    import copy

    pipe = copy.copy(ours["a"])
    pipe.backend = copy.copy(pipe.backend)
    pipe.backend.encodes_images = False
    pipe.backend.name = "fake"

    def boom(*a, **k):
        raise AssertionError("model work started")

    pipe.backend.encode_text = boom
    with pytest.raises(ValueError, match="image: backend='fake' has no VAE encoder"):
        pipe.generate("x", image=random_image(0), steps=2)
