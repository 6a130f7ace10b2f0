"""TensorRT: the refusal path without TensorRT / a GPU (runs everywhere), the optimisation
profile shapes, and (only where TensorRT and a CUDA GPU exist) engines against the torch modules."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastdiff import iospec, sd15, testing
from fastdiff.export import tensorrt as trt_export
from fastdiff.weights import read_configs


def _has_tensorrt() -> str | None:
    """None when engines can be built here, else the reason they cannot."""
    try:
        trt_export.require_tensorrt()
    except trt_export.TensorRTUnavailable as e:
        return str(e)
    return None


NO_TRT = _has_tensorrt()


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a GPU are present: the refusal path cannot be shown here")
def test_cli_refuses_without_tensorrt(monkeypatch, capsys):
    """Exit code 2 and a message naming what is missing; no export is attempted."""
    from fastdiff.export import onnx_export
    from fastdiff.export.__main__ import main

    monkeypatch.setattr(onnx_export, "export", lambda *a, **k: pytest.fail("exported although TensorRT is missing"))
    assert main(["sd15", "--engine", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err.lower() and "Nothing was exported" in err


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT and a GPU are present")
def test_backend_refuses_without_tensorrt(tmp_path):
    from fastdiff.backends import make_backend

    with pytest.raises(trt_export.TensorRTUnavailable):
        make_backend("tensorrt", tmp_path, device=torch.device("cpu"), dtype=torch.float16)


def test_profile_shapes():
    """Text encoder / UNet rows are doubled for CFG (min 1 row: guidance off); the VAE's are not."""
    configs = sd15.SD15_CONFIGS
    dyn = trt_export.Profile.for_request(2, 512, 768)
    assert not dyn.static
    unet = dyn.shapes(iospec.UNET, configs)
    assert unet["sample"] == ((1, 4, 32, 32), (4, 4, 64, 96), (8, 4, 128, 128))
    assert unet["timestep"] == ((1,), (1,), (1,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (4, 77, 768), (8, 77, 768))
    assert dyn.shapes(iospec.VAE_DECODER, configs)["latent_sample"] == ((1, 4, 32, 32), (2, 4, 64, 96), (4, 4, 128, 128))
    assert dyn.shapes(iospec.TEXT_ENCODER, configs)["input_ids"] == ((1, 77), (4, 77), (8, 77))
    # img2img encodes each image once: one row per image, image-sized input
    assert dyn.shapes(iospec.VAE_ENCODER, configs)["sample"] == ((1, 3, 256, 256), (2, 3, 512, 768), (4, 3, 1024, 1024))

    static = trt_export.Profile.for_request(1, 512, 512, static=True)
    assert static.static
    assert set(static.shapes(iospec.UNET, configs)["sample"]) == {(2, 4, 64, 64)}
    assert static.key() != dyn.key()


# ----------------------------------------------------------------------------------------------
# with TensorRT and a GPU


@pytest.mark.skipif(NO_TRT is not None, reason=f"needs TensorRT and a CUDA GPU: {NO_TRT}")
def test_engines_match_torch(tmp_path, monkeypatch):
    from fastdiff.backends.trt_backend import TensorRTBackend
    from fastdiff.export import onnx_export as ox

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    folder = testing.build_random_folder(tmp_path / "sd", "a", seed=5, sd15_layout=False)
    export_dir = ox.export(folder, precision="fp16", attention="plain")
    profile = trt_export.Profile.for_request(1, 32, 48, static=True)
    engines = trt_export.build_engines(export_dir, profile)
    assert trt_export.find_engines(export_dir, profile) == engines
    assert trt_export.build_engines(export_dir, profile) == engines  # reused, not rebuilt
    assert (engines.parent / "timing.cache").is_file()

    backend = TensorRTBackend(engines, export_dir, device=torch.device("cuda"))
    nets = ox.load_networks(folder)
    configs = read_configs(folder)
    for name in iospec.NETWORKS:
        net = iospec.NETWORKS[name]
        rows = 1 if net.per_image else 2
        inputs = iospec.sample_inputs(net, configs, batch=rows, height=32, width=48)
        with torch.no_grad():
            ref = ox.wrap(name, nets[name], configs, "fp32")(**inputs)
        ref = (ref if isinstance(ref, tuple) else (ref,))[0].numpy()
        if name == "text_encoder":
            got = backend.encode_text(inputs["input_ids"].long())
        elif name == "unet":
            got = backend.unet(inputs["sample"], inputs["timestep"][0], inputs["encoder_hidden_states"])
            got = backend.unet(inputs["sample"], inputs["timestep"][0], inputs["encoder_hidden_states"])  # graph replay
        elif name == "vae_decoder":
            got = backend.decode(inputs["latent_sample"])
        else:
            got = torch.cat(backend.encode_image(inputs["sample"]), dim=1)  # [B, 2 * latent, h, w], as latent_parameters
        err = np.abs(got.float().cpu().numpy() - ref).max()
        assert err <= 3e-2 * max(1.0, np.abs(ref).max()), f"{name}: {err}"
    manifest = json.loads((engines / "engines.json").read_text())
    assert set(manifest["files"]) == {f"{n}.plan" for n in iospec.NETWORKS}
