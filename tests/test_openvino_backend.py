"""The openvino backend: whole pipelines and the VAE encoder against the torch backend at float32
(every scheduler, batch 2, negative prompts, non-square), bf16 where the CPU runs it, a damaged
export rebuilt, and its errors for devices and dtypes it does not run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff import iospec, precision, schedulers
from fastdiff.export import cache
from fastdiff.pipeline import Pipeline

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")  # the export it compiles is checked with onnxruntime

H, W = 32, 48  # latents 16x24: multiples of the tiny UNet's 2
PROMPTS = ["a red circle on the left", "two blue squares"]


@pytest.fixture(scope="module")
def pipes(exported):
    folder, _, root = exported
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(root))
        ours = Pipeline.from_pretrained(folder, backend="openvino", device="cpu", dtype=torch.float32)
    ref = Pipeline.from_pretrained(folder, backend="torch", device="cpu", dtype=torch.float32)
    return ref, ours


def _pair(ref, ours, scheduler, steps=4, guidance=7.5, seed=None):
    seed = int(torch.randint(0, 2**31, ()).item()) if seed is None else seed
    kw = dict(steps=steps, guidance_scale=guidance, height=H, width=W, seed=seed, scheduler=scheduler, output_type="np")
    want = ref.generate(PROMPTS, negative_prompt=["blurry", ""], **kw)
    got = ours.generate(PROMPTS, negative_prompt=["blurry", ""], **kw)
    return want, got, seed


@pytest.mark.parametrize("scheduler", schedulers.NAMES)
def test_float32_matches_torch_backend(pipes, scheduler):
    ref, ours = pipes
    assert ours.backend.name == "openvino" and ours.dtype == torch.float32
    want, got, seed = _pair(ref, ours, scheduler)
    assert got.shape == want.shape == (2, H, W, 3)
    err = np.abs(got - want).max()
    assert err <= 1e-3, f"{scheduler}, seed {seed}: max abs {err:.2e}"
    assert want.std() > 1e-3, f"seed {seed}"


@pytest.mark.skipif(
    not precision.cpu_runs_fast(torch.bfloat16),
    reason="this CPU has no AMX-BF16/AVX512-BF16: openvino would refuse bf16 here (tests/test_precision.py checks the refusal)",
)
def test_bf16_stays_near_float32(exported, pipes, monkeypatch):
    """bf16 is a compile option on the same export: the image stays close to float32's (bf16
    keeps 8 significant bits; the tiny random model's images move by a few percent)."""
    folder, _, root = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(root))
    ref, _ = pipes
    ours = Pipeline.from_pretrained(folder, backend="openvino", device="cpu", dtype=torch.bfloat16)
    want, got, seed = _pair(ref, ours, "dpmpp_2m")
    err = np.abs(got - want)
    print(f"openvino bf16 vs float32: mean {err.mean():.2e}, max {err.max():.2e}")
    # about 3x what an AMX Xeon measured (benchmarks/NOTES-cpu.md, "Tests on the AMX machine")
    assert err.mean() <= 1e-2 and err.max() <= 6e-2, f"seed {seed}: mean {err.mean():.2e}, max {err.max():.2e}"


def _encode_both(ref, backend):
    """(torch backend's, `backend`'s) (mean, logvar) of one fresh image: batch 2, non-square."""
    image = torch.rand(2, 3, 64, 96) * 2 - 1
    return ref.backend.encode_image(image), backend.encode_image(image)


def test_encode_image_matches_torch_backend(pipes):
    ref, ours = pipes
    assert ours.backend.encodes_images
    for what, a, b in zip(("mean", "logvar"), *_encode_both(ref, ours.backend)):
        assert b.dtype == torch.float32 and b.device.type == "cpu" and a.shape == b.shape == (2, 4, 32, 48)
        err = (a - b).abs().max().item()
        assert err <= 1e-4, f"{what}: max abs {err:.2e}"


@pytest.mark.skipif(not precision.cpu_runs_fast(torch.bfloat16), reason="this CPU has no AMX-BF16/AVX512-BF16")
def test_bf16_encode_image_stays_near_float32(exported, pipes):
    """bf16 compiles the same encoder: (mean, logvar) stay float32 and near the torch backend's
    (about 3x the error measured on a bf16 CPU: mean 2.8e-3, max 2.3e-2 on this tiny model)."""
    from fastdiff.backends.openvino_backend import OpenVINOBackend

    ref, _ = pipes
    bf16 = OpenVINOBackend(exported[1], device=torch.device("cpu"), dtype=torch.bfloat16)
    for what, a, b in zip(("mean", "logvar"), *_encode_both(ref, bf16)):
        assert b.dtype == torch.float32 and a.shape == b.shape == (2, 4, 32, 48)
        err = (a - b).abs()
        assert err.mean() <= 1e-2 and err.max() <= 6e-2, f"{what}: mean {err.mean():.2e}, max {err.max():.2e}"


def test_damaged_export_is_rebuilt(exported, tmp_path, monkeypatch, fake_trace):
    """A cached export whose UNet file changed is not compiled: it is exported again (the trace
    step a copy of the good file, the rest of the export real), and the pipeline runs from the
    rebuilt folder."""
    import shutil

    folder, out, _ = exported
    root = tmp_path / "cache"
    copy = root / "exports" / out.name
    shutil.copytree(out, copy)
    onnx = copy / "unet" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100] + b"\0" * 100)  # same size, different bytes
    assert not cache.validate(copy)[0]
    monkeypatch.setenv("FASTDIFF_CACHE", str(root))
    pipe = Pipeline.from_pretrained(folder, backend="openvino", device="cpu", dtype=torch.float32)
    assert pipe.backend.export_dir == copy and cache.validate(copy)[0]
    assert fake_trace == list(iospec.NETWORKS)  # every network exported again
    image = pipe.generate("a cat", steps=2, height=H, width=W, seed=1, output_type="np")
    assert np.isfinite(image).all() and image.std() > 1e-3


def test_refuses_what_it_does_not_run(exported, monkeypatch):
    folder, _, root = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(root))
    with pytest.raises(ValueError, match="backend='openvino' runs on the CPU; got device='meta'"):
        Pipeline.from_pretrained(folder, backend="openvino", device="meta", dtype=torch.float32)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_fp16"}))  # fp16 fast, yet not here
    with pytest.raises(ValueError, match="backend='openvino' runs torch.float32 or torch.bfloat16"):
        Pipeline.from_pretrained(folder, backend="openvino", device="cpu", dtype=torch.float16)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ValueError, match="dtype=torch.bfloat16: this CPU has no AMX_BF16 or AVX512_BF16"):
        Pipeline.from_pretrained(folder, backend="openvino", device="cpu", dtype=torch.bfloat16)


def test_export_cli_format_openvino(exported, monkeypatch, capsys):
    """`python -m fastdiff.export MODEL --format openvino` reuses the export and compiles it;
    options it cannot take are refused before any work."""
    from fastdiff.export import onnx_export
    from fastdiff.export.__main__ import main

    folder, out, root = exported
    monkeypatch.setenv("FASTDIFF_CACHE", str(root))
    monkeypatch.setattr(onnx_export, "export_network", lambda *a, **k: pytest.fail("re-exported a valid folder"))
    assert main([str(folder), "--format", "openvino"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "openvino     compiled for this CPU" in printed
    assert main([str(folder), "--format", "openvino", "--fp16"]) == 2
    assert "--format openvino compiles the float32 MHA export" in capsys.readouterr().err


def test_threads_get_their_own_requests(pipes):
    """Calls from several threads at once (an infer request per thread and network) give each
    thread the image it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    _, ours = pipes
    kw = dict(steps=3, height=H, width=W, scheduler="euler", output_type="np")
    alone = {seed: ours.generate("a red circle", seed=seed, **kw) for seed in (1, 2, 3, 4)}
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(alone, pool.map(lambda s: ours.generate("a red circle", seed=s, **kw), alone)))
    for seed in alone:
        assert np.array_equal(alone[seed], together[seed]), f"seed {seed}"
