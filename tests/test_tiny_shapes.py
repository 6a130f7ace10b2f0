"""The embedded model: it is shipped, small, loads in diffusers too, and draws what it is asked.

Prompt adherence is judged on the held-out prompts (attribute combinations never trained on) by
the data set's own pixel classifier: the colour of the shape and its kind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastdiff import precision, testing
from fastdiff.pipeline import Pipeline
from fastdiff.weights import resolve_model

ROOT = Path(__file__).resolve().parents[1]
shapes = testing.load_script(ROOT / "training" / "shapes_data.py")

MODEL = ROOT / "fastdiff" / "assets" / "tiny-shapes"
PROMPTS = shapes.heldout_prompts()
GUIDANCE = 6.0


def test_shipped_and_small(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))  # an empty cache: no export to prefer
    monkeypatch.delenv("FASTDIFF_MODEL", raising=False)
    assert resolve_model("tiny-shapes") == MODEL
    assert resolve_model(None) == MODEL
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    print(f"tiny-shapes: {size / 1e6:.1f} MB")
    assert size <= 20e6
    assert not list(MODEL.rglob("*.bin")) and list(MODEL.rglob("*.safetensors"))


def _adherence(images: np.ndarray) -> tuple[float, float]:
    found = [shapes.classify((im * 255).round().astype(np.uint8)) for im in images]
    colour = np.mean([c == s.colour for (c, _), (_, s) in zip(found, PROMPTS)])
    kind = np.mean([k == s.shape for (_, k), (_, s) in zip(found, PROMPTS)])
    return float(colour), float(kind)


# (backend, scheduler, steps, network dtype). The bf16 row needs a CPU with bf16 instructions;
# elsewhere it skips, saying so. openvino bf16 (a compile option on the onnxruntime row's export)
# kept the same figures on an AMX Xeon (benchmarks/NOTES-cpu.md); it is not re-run here, to keep
# the suite inside its time budget.
CONFIGS = [
    ("torch", "dpmpp_2m", 25, "float32"),
    ("torch", "dpmpp_2m", 10, "float32"),
    ("torch", "euler_a", 25, "float32"),
    ("onnxruntime", "dpmpp_2m", 25, "float32"),
    ("torch", "dpmpp_2m", 25, "bfloat16"),
]


@pytest.fixture(scope="module")
def adherence(shared_cache):
    """(colour, shape) match rates per (backend, scheduler, steps), each generated once. The
    onnxruntime export goes to the run's shared cache, where tests/test_latency.py reuses it."""
    results = {}

    def measure(config):
        if config not in results:
            backend, scheduler, steps, dtype = config
            if dtype == "bfloat16" and not precision.cpu_runs_fast(torch.bfloat16):
                pytest.skip("this CPU has no bf16 instructions (AMX-BF16 or AVX512-BF16): fastdiff runs float32 here")
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("FASTDIFF_CACHE", str(shared_cache))
                pipe = Pipeline.from_pretrained(MODEL, backend=backend, device="cpu", dtype=dtype)
            images = pipe.generate(
                [p for p, _ in PROMPTS], steps=steps, guidance_scale=GUIDANCE, seed=0, scheduler=scheduler,
                output_type="np",
            )
            results[config] = _adherence(images)
            colour, kind = results[config]
            print(f"{backend} {dtype} {scheduler} {steps} steps: colour {colour:.1%}, shape {kind:.1%} "
                  f"on {len(PROMPTS)} held-out prompts")
        return results[config]

    return measure


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_prompt_colour(adherence, config):
    assert len(PROMPTS) >= 32
    colour, _ = adherence(config)
    assert colour >= 0.90, colour


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_prompt_shape(adherence, config):
    _, kind = adherence(config)
    assert kind >= 0.70, kind


def test_matches_diffusers():
    """The trained model's realistic activations through the whole pipeline, vs diffusers."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(MODEL, backend="torch", device="cpu")
    prompts = [p for p, _ in PROMPTS[:4]]
    seed = int(torch.randint(0, 2**31, ()).item())
    expected = ref(prompts, num_inference_steps=12, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images
    got = ours.generate(prompts, steps=12, guidance_scale=GUIDANCE, seed=seed, output_type="np")
    err, mean = np.abs(got - expected).max(), np.abs(got - expected).mean()
    print(f"tiny-shapes vs diffusers, seed {seed}: max abs {err:.2e}, mean abs {mean:.2e}")
    # The trained model's guided 12-step loop amplifies float32 rounding on a few pixels for some
    # seeds: over seeds 0-59, max abs median 7.3e-6, largest 2.0e-4 (seed 55), mean abs at most
    # 2.4e-6; a CI run saw 3.0e-4. Small real differences move whole images: guidance 6.1 for
    # 6.0 gives mean abs 7.7e-4, 13 steps for 12 5.3e-3 (seed 1).
    assert err <= 1e-3 and mean <= 1e-5, f"seed {seed}"


# ----------------------------------------------------------------------------------------------
# img2img and inpainting on the embedded model, judged by the same pixel classifier
# (benchmarks/edit_quality.py measures more seeds and saves the picture).
edit_quality = testing.load_script(ROOT / "benchmarks" / "edit_quality.py")
EDIT_SEEDS = 6


@pytest.fixture(scope="module")
def editing_pipe():
    return Pipeline.from_pretrained(MODEL, backend="torch", device="cpu", dtype=torch.float32)


def test_img2img_changes_the_colour(editing_pipe):
    """A red circle prompted blue at strength 0.75: blue circles (the embedded model moves them:
    IoU is reported, not required, at this strength)."""
    r, _ = edit_quality.measure(editing_pipe, EDIT_SEEDS, "img2img", 0.75, 7.5)
    print(f"img2img 0.75 / 7.5: {r}")
    assert r["colour"] >= 5 / 6 and r["shape"] >= 5 / 6, r


def test_img2img_keeps_the_picture_at_half_strength(editing_pipe):
    """Half the schedule at guidance 2: the input's red circle stays where it was."""
    r, _ = edit_quality.measure(editing_pipe, EDIT_SEEDS, "img2img", 0.5, 2.0)
    print(f"img2img 0.5 / 2.0: {r}")
    assert r["kept_colour"] >= 5 / 6 and r["iou"] >= 0.6, r


@pytest.mark.parametrize("guidance", [7.5, 2.0])
def test_inpainting_replaces_inside_and_keeps_outside(editing_pipe, guidance):
    """A blue circle in the masked right third; outside, the red square stays and the picture
    changes little more than the VAE round trip of the input alone changes it."""
    r, _ = edit_quality.measure(editing_pipe, EDIT_SEEDS, "inpaint", 1.0, guidance)
    print(f"inpaint 1.0 / {guidance}: {r}")
    assert r["colour"] >= 5 / 6 and r["shape"] >= 5 / 6, r
    assert r["iou"] >= (0.2 if guidance > 5 else 0.4), r
    assert r["kept_colour"] >= 5 / 6 and r["outside_change"] <= 3 * r["vae_round_trip_change"], r
