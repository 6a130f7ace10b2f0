"""The onnxruntime backend: whole pipelines and the VAE encoder against the torch backend,
backend selection (`onnxruntime`, `auto`), size errors, and diffusers' own ONNX pipeline opening
our export."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch


from fastdiff.backends import make_backend
from fastdiff.export import onnx_export as ox
from fastdiff.pipeline import Pipeline

pytest.importorskip("onnxruntime")

H, W = 32, 48  # latents 16x24: multiples of the tiny UNet's 2


@pytest.fixture(scope="module")
def pipes(exported):
    folder, _, root = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(root))
        ours = Pipeline.from_pretrained(folder, backend="onnxruntime", device="cpu")
    ref = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    return ref, ours


@pytest.mark.parametrize("scheduler,steps,guidance", [("ddim", 4, 7.5), ("dpmpp_2m", 5, 5.0), ("euler", 3, 1.0)])
def test_pipeline_matches_torch_backend(pipes, scheduler, steps, guidance):
    ref, ours = pipes
    assert ours.backend.name == "onnxruntime" and ref.backend.name == "torch"
    seed = int(torch.randint(0, 2**31, ()).item())
    kwargs = dict(steps=steps, guidance_scale=guidance, height=H, width=W, seed=seed, scheduler=scheduler, output_type="np")
    prompts = ["a red circle on the left", "two blue squares"]
    expected = ref.generate(prompts, negative_prompt=["blurry", ""], **kwargs)
    got = ours.generate(prompts, negative_prompt=["blurry", ""], **kwargs)
    assert got.shape == expected.shape == (2, H, W, 3)
    assert np.abs(got - expected).max() <= 1e-3, f"seed {seed}: max abs {np.abs(got - expected).max():.2e}"
    assert expected.std() > 1e-3, f"seed {seed}"


def test_backend_calls_return_torch_tensors(pipes):
    _, ours = pipes
    b = ours.backend
    ctx = b.encode_text(torch.randint(0, 49408, (2, 77)))  # int64 ids, as the pipeline passes them
    assert isinstance(ctx, torch.Tensor) and ctx.dtype == torch.float32 and ctx.shape[:2] == (2, 77)
    eps = b.unet(torch.randn(2, 4, 8, 12), torch.tensor(500.0), ctx)
    assert eps.shape == (2, 4, 8, 12) and eps.device.type == "cpu"
    img = b.decode(torch.randn(1, 4, 8, 12))
    assert img.shape == (1, 3, 16, 24)


def test_encode_image_matches_torch_backend(pipes):
    """The exported VAE encoder gives the torch backend's (mean, logvar): float32, on the CPU,
    batch 2, a non-square size other than the traced and checked ones."""
    ref, ours = pipes
    assert ours.backend.encodes_images
    image = torch.rand(2, 3, 64, 96) * 2 - 1
    expected = ref.backend.encode_image(image)
    got = ours.backend.encode_image(image)
    for what, a, b in zip(("mean", "logvar"), got, expected):
        assert a.dtype == torch.float32 and a.device.type == "cpu" and a.shape == b.shape == (2, 4, 32, 48)
        err = (a - b).abs().max().item()
        assert err <= 1e-4, f"{what}: max abs {err:.2e}"
    with pytest.raises(ValueError, match="height=63, width=96: must be multiples of 2"):
        ours.backend.encode_image(torch.zeros(1, 3, 63, 96))


def test_unet_size_the_graph_cannot_take_is_a_clear_error(pipes):
    _, ours = pipes
    ctx = torch.zeros(1, 77, 32)
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.backend.unet(torch.randn(1, 4, 9, 12), torch.tensor(10.0), ctx)


def test_export_size_rule_is_named_before_model_work(pipes, monkeypatch):
    """A size the export's UNet cannot take is refused before the text encoder runs, with the
    export's rule and the torch backend's. (This tiny UNet downsamples once, so a multiple of 8 px
    always fits; a deeper UNet's rule is set on the instance to reach the check.)"""
    _, ours = pipes
    monkeypatch.setattr(ours.backend, "latent_multiple", 8)  # a 4-level UNet, as SD1.5's
    monkeypatch.setattr(ours.backend, "encode_text", lambda ids: pytest.fail("model work before the size check"))
    with pytest.raises(ValueError, match=r"height=40: the onnxruntime backend of this model takes multiples of 16 px; backend='torch' takes multiples of 2 px"):
        ours.generate("x", height=40, width=48, steps=1)


def test_auto_is_torch_whatever_the_cache_holds(exported, cache_root, tmp_path, monkeypatch):
    """auto never picks the export: its UNet narrows the sizes the model accepts (see pick_auto)."""
    folder = exported[0]
    monkeypatch.setattr(ox, "export", lambda *a, **k: pytest.fail("auto must not start an export"))
    assert make_backend("auto", folder, device=torch.device("cpu"), dtype=torch.float32).name == "torch"
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "empty"))
    assert make_backend("auto", folder, device=torch.device("cpu"), dtype=torch.float32).name == "torch"


def test_onnxruntime_exports_when_nothing_is_cached(exported, tmp_path, monkeypatch, caplog):
    folder, out, _ = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "empty"))
    calls = []

    def fake_export(root, **kwargs):
        calls.append((root, kwargs))
        return out

    monkeypatch.setattr(ox, "export", fake_export)
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        backend = make_backend("onnxruntime", folder, device=torch.device("cpu"), dtype=torch.float32)
    assert backend.name == "onnxruntime"
    assert calls == [(folder, {"precision": "fp32", "attention": "mha", "adapters": None})]
    assert "exporting" in caplog.text


def test_diffusers_onnx_pipeline_opens_the_export(exported):
    """diffusers' OnnxStableDiffusionPipeline (int32 ids, float [1] timestep) runs our folder and
    matches diffusers' torch pipeline given the same initial latents."""
    from diffusers import DDIMScheduler, OnnxStableDiffusionPipeline, StableDiffusionPipeline

    folder, out, _ = exported
    onnx_pipe = OnnxStableDiffusionPipeline.from_pretrained(
        out, provider="CPUExecutionProvider", vae_encoder=None, safety_checker=None, feature_extractor=None
    )
    torch_pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    for p in (onnx_pipe, torch_pipe):
        p.scheduler = DDIMScheduler.from_config(torch_pipe.scheduler.config)
        p.set_progress_bar_config(disable=True)
    # diffusers' ONNX pipeline assumes SD's 8x VAE; the tiny VAE upsamples 2x, so it is asked for
    # 64 x 96 and the torch pipeline for the 16 x 24 image that the same latents decode to.
    latents = torch.randn(1, 4, 8, 12)
    kwargs = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=7.5, output_type="np")
    got = onnx_pipe(latents=latents.numpy(), height=64, width=96, **kwargs).images
    expected = torch_pipe(latents=latents, height=16, width=24, **kwargs).images
    assert got.shape == expected.shape == (1, 16, 24, 3)
    assert np.abs(got - expected).max() <= 1e-3


def test_auto_asks_each_backend_its_cost(monkeypatch):
    """pick_auto takes the lowest auto_cost among registered backends; one whose module cannot be
    imported, or that answers None, is no candidate."""
    import sys
    import types

    from fastdiff import backends
    from fastdiff.backends.base import Backend

    class Cheap(Backend):
        name = "cheap"

        @classmethod
        def auto_cost(cls, device):
            return 0.5 if device.type == "cpu" else None

    module = types.ModuleType("fake_cheap_backend")
    module.Cheap = Cheap
    monkeypatch.setitem(sys.modules, "fake_cheap_backend", module)
    registry = dict(backends.REGISTRY, cheap="fake_cheap_backend:Cheap", missing="no_such_module_here:X")
    monkeypatch.setattr(backends, "REGISTRY", registry)
    assert backends.pick_auto(torch.device("cpu")) == "cheap"
    assert backends.pick_auto(torch.device("meta")) == "torch"  # Cheap answers None there
    monkeypatch.setattr(backends, "REGISTRY", {"missing": "no_such_module_here:X"})
    with pytest.raises(RuntimeError, match="no backend can run on cpu"):
        backends.pick_auto(torch.device("cpu"))
