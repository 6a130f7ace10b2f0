"""The GPU path: Triton kernels inside the whole pipeline, the CUDA-graph step, the fp16 VAE guard.

The kernel-in-pipeline test runs everywhere (Triton's interpreter on CPU, in a subprocess because
TRITON_INTERPRET must be set before triton is first imported). The CUDA-graph tests need a GPU and
skip elsewhere, saying so.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastdiff import schedulers
from fastdiff.pipeline import Pipeline

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/device_check.sh)")


@pytest.fixture(scope="module")
def folder(model_a):
    return model_a  # the run's shared tiny model "a" (tests/conftest.py), read only here


def test_triton_kernels_in_pipeline_match_torch(folder, tmp_path):
    """FASTDIFF_KERNELS=triton (interpreter on CPU, compiled on CUDA) vs the torch reference ops."""
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from fastdiff.pipeline import Pipeline
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # fp32 means fp32: with TF32 convolutions (cuDNN's default) a 1e-6 difference from the
        # kernels flips input roundings to 10 mantissa bits, and the images then differ by 2e-3
        # (measured on an H200) for reasons that are not the kernels'.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        out = {{}}
        for mode in ("torch", "triton"):
            pipe = Pipeline.from_pretrained({str(folder)!r}, backend="torch", device=device,
                                            dtype=torch.float32, kernels=mode, cuda_graph=False)
            # One prompt: guidance still gives the networks a batch of 2, and Triton's CPU
            # interpreter runs every program of every launch in Python (the suite's longest test).
            out[mode] = pipe.generate(["a red circle"], steps=1, height=16, width=24, seed=4,
                                      scheduler="dpmpp_2m", output_type="np")
        np.save({str(tmp_path / "torch.npy")!r}, out["torch"])
        np.save({str(tmp_path / "triton.npy")!r}, out["triton"])
        """
    )
    env = dict(os.environ, FASTDIFF_KERNELS="triton")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = np.load(tmp_path / "torch.npy"), np.load(tmp_path / "triton.npy")
    err = np.abs(ref - got).max()
    print(f"triton vs torch kernels, whole pipeline: max abs {err:.2e}")
    assert err <= 1e-3
    assert ref.std() > 1e-3


def test_kernel_mode_reaches_the_kernels(folder, monkeypatch):
    """kernels="triton" must route ops to fastdiff.kernels (spied, torch stand-ins), "torch" must not."""
    import fastdiff.ops as ops
    from fastdiff.kernels import attention, geglu, group_norm

    calls = []

    def spy(name, ref):
        def f(*a, **k):
            calls.append(name)
            k.pop("out", None)
            return ref(*a, **k)

        return f

    monkeypatch.setattr(attention, "attention", spy("attention", ops.attention_ref))
    monkeypatch.setattr(group_norm, "group_norm", spy("group_norm", ops.group_norm_ref))
    monkeypatch.setattr(geglu, "geglu", spy("geglu", ops.geglu_ref))
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", kernels="torch")
    pipe.generate("x", steps=1, height=16, width=16, seed=0, output_type="np")
    assert calls == []
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", kernels="triton")
    pipe.generate("x", steps=1, height=16, width=16, seed=0, output_type="np")
    assert {"attention", "group_norm", "geglu"} <= set(calls)


def test_fp16_vae_overflow_decodes_again_in_fp32(folder, caplog):
    """A non-finite fp16 decode is redone in fp32 with one warning; the result equals an fp32 decode."""
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", dtype=torch.float32)
    pipe.dtype = torch.float16  # the guard (and the noise draw) read it: the networks stay fp32 on this CPU
    expected = pipe.generate("x", steps=2, height=16, width=16, seed=9, output_type="np")
    real = pipe.backend.decode
    pipe.backend.decode = lambda z: torch.full_like(real(z), float("inf"))
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        got = pipe.generate("x", steps=2, height=16, width=16, seed=9, output_type="np")
        pipe.generate("x", steps=2, height=16, width=16, seed=9, output_type="np")
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= 1e-6
    assert sum("fp32" in r.getMessage() for r in caplog.records) == 1


ALL_SCHEDULERS = schedulers.NAMES


def _graph_body_on_cpu(pipe, monkeypatch):
    """Route `pipe` through GraphedStep on the CPU: its static buffers and device-tensor step index,
    the body run eagerly instead of replayed (everything the CUDA path does but the capture)."""
    monkeypatch.setattr(pipe, "_graphs_enabled", lambda: True)
    return pipe


@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_graph_body_equals_eager_loop_cpu(folder, scheduler, monkeypatch):
    """The step as captured (tensor step index, tables indexed on device, state reset between
    calls) computes what the plain loop computes, for every scheduler, twice in a row."""
    graphed = _graph_body_on_cpu(Pipeline.from_pretrained(folder, backend="torch", device="cpu"), monkeypatch)
    eager = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    kw = dict(steps=5, height=16, width=24, seed=1, scheduler=scheduler, output_type="np")
    want = eager.generate(["a red circle", "b"], **kw)
    for _ in range(2):  # the second call reuses the buffers: any state left over would show
        got = graphed.generate(["a red circle", "b"], **kw)
        assert np.abs(got - want).max() <= 1e-5, scheduler
    assert len(graphed._graphs) == 1
    assert sorted(k[0] for k in graphed._calls) == ["text_encoder", "vae_decode"]  # through GraphedCall too


IMAGE = np.random.default_rng(0).random((24, 16, 3)).astype(np.float32)  # img2img's input, [H, W, 3] in [0, 1]
MASK = np.zeros((24, 16), np.float32)
MASK[4:20, 8:] = 1.0  # repaint the right half


def test_graph_body_never_stale_cpu(folder, monkeypatch):
    """Size, steps, scheduler, guidance, batch, img2img strength and inpainting changes between
    calls: each result equals the eager loop's, and each new setting (but not guidance, a buffer)
    made a new GraphedStep (two strengths: two truncated schedules, two graphs)."""
    graphed = _graph_body_on_cpu(Pipeline.from_pretrained(folder, backend="torch", device="cpu"), monkeypatch)
    eager = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    settings = [
        dict(prompt="x", height=16, width=16, steps=3, scheduler="ddim", guidance_scale=7.5),
        dict(prompt="x", height=24, width=16, steps=3, scheduler="ddim", guidance_scale=7.5),
        dict(prompt="x", height=24, width=16, steps=4, scheduler="ddim", guidance_scale=7.5),
        dict(prompt="x", height=24, width=16, steps=4, scheduler="euler_a", guidance_scale=7.5),
        dict(prompt="x", height=24, width=16, steps=4, scheduler="euler_a", guidance_scale=2.0),
        dict(prompt="x", height=24, width=16, steps=4, scheduler="euler_a", guidance_scale=1.0),
        dict(prompt=["x", "y"], height=24, width=16, steps=4, scheduler="euler_a", guidance_scale=2.0),
        dict(prompt="x", height=16, width=16, steps=3, scheduler="ddim", guidance_scale=7.5),
        dict(prompt="x", steps=4, scheduler="euler_a", guidance_scale=2.0, image=IMAGE, strength=0.5),
        dict(prompt="x", steps=4, scheduler="euler_a", guidance_scale=2.0, image=IMAGE, strength=0.75),
        dict(prompt="x", steps=4, scheduler="euler_a", guidance_scale=2.0, image=IMAGE, mask_image=MASK, strength=0.75),
    ]
    keys = set()
    for kw in settings:
        a = graphed.generate(seed=2, output_type="np", **kw)
        b = eager.generate(seed=2, output_type="np", **kw)
        assert np.abs(a - b).max() <= 1e-5, kw
        keys |= set(graphed._graphs)
    # 11 calls, 9 keys: guidance 7.5 -> 2.0 and the repeat of the first setting share a key.
    assert len(keys) == 9


@cuda
def test_cuda_graph_equals_eager_fp16(folder):
    graphed = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16)
    eager = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16, cuda_graph=False)
    for sched in ("dpmpp_2m", "euler_a", "pndm"):
        a = graphed.generate(["a", "b"], steps=6, height=32, width=48, seed=1, scheduler=sched, output_type="np")
        b = eager.generate(["a", "b"], steps=6, height=32, width=48, seed=1, scheduler=sched, output_type="np")
        assert np.abs(a - b).max() <= 1e-3, sched
    assert len(graphed._graphs) == 3
    assert len(graphed._calls) == 2  # text encoder and VAE decode, one input shape each


@cuda
def test_cuda_graph_never_stale(folder):
    """Changing size, steps, scheduler or guidance between calls gives the eager result each time."""
    graphed = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16)
    eager = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16, cuda_graph=False)
    settings = [
        dict(height=32, width=32, steps=4, scheduler="ddim", guidance_scale=7.5),
        dict(height=48, width=32, steps=4, scheduler="ddim", guidance_scale=7.5),
        dict(height=48, width=32, steps=7, scheduler="ddim", guidance_scale=7.5),
        dict(height=48, width=32, steps=7, scheduler="euler", guidance_scale=7.5),
        dict(height=48, width=32, steps=7, scheduler="euler", guidance_scale=3.0),
        dict(height=48, width=32, steps=7, scheduler="euler", guidance_scale=1.0),
        dict(height=32, width=32, steps=4, scheduler="ddim", guidance_scale=7.5),
        dict(steps=7, scheduler="euler", guidance_scale=7.5, image=IMAGE, strength=0.5),
        dict(steps=7, scheduler="euler", guidance_scale=7.5, image=IMAGE, strength=0.8),
        dict(steps=7, scheduler="euler", guidance_scale=7.5, image=IMAGE, mask_image=MASK, strength=0.8),
    ]
    for kw in settings:
        a = graphed.generate("a red circle", seed=2, output_type="np", **kw)
        b = eager.generate("a red circle", seed=2, output_type="np", **kw)
        assert np.abs(a - b).max() <= 1e-3, kw


def test_fp16_vae_overflow_without_fp32_vae_says_so(folder):
    """A backend with no fp32 VAE (onnxruntime, TensorRT engines) raises, naming the way out."""
    pipe = Pipeline.from_pretrained(folder, backend="torch", device="cpu", dtype=torch.float32)
    pipe.dtype = torch.float16
    real = pipe.backend.decode

    class NoFp32:  # the backend's interface, declaring no fp32 VAE
        name = "stand-in"
        fp32_decode = False

        def __getattr__(self, attr):
            return getattr(real.__self__, attr)

        def decode(self, z):
            return torch.full_like(real(z), float("nan"))

    pipe.backend = NoFp32()
    with pytest.raises(RuntimeError, match="no fp32 VAE"):
        pipe.generate("x", steps=1, height=16, width=16, seed=0, output_type="np")


@cuda
def test_cuda_graph_rebuilt_when_kernel_mode_changes(folder):
    """A graph recorded with the Triton ops is not replayed under kernels("torch"), and vice versa."""
    from fastdiff import ops

    graphed = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16)
    kw = dict(height=32, width=32, steps=3, seed=5, output_type="np")
    with ops.kernels("triton"):
        a = graphed.generate("a", **kw)
    with ops.kernels("torch"):
        b = graphed.generate("a", **kw)
    assert sorted(k.kernels for k in graphed._graphs) == ["torch", "triton"]
    assert np.abs(a - b).max() <= 1e-2  # fp16 Triton vs fp16 torch ops: same function


def test_channels_last_same_images_and_nhwc_activations(folder, monkeypatch):
    """channels_last=True: every 4-D GroupNorm input is NHWC in memory, and the images equal the
    NCHW pipeline's (fp32, CPU: the same function, summed in another order)."""
    import fastdiff.ops as ops

    nchw = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    nhwc = Pipeline.from_pretrained(folder, backend="torch", device="cpu", channels_last=True)
    kw = dict(steps=3, height=16, width=24, seed=6, output_type="np")
    want = nchw.generate(["a red circle", "b"], **kw)

    layouts = []
    real = ops.group_norm

    def spy(x, *a, **k):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return real(x, *a, **k)

    monkeypatch.setattr(ops, "group_norm", spy)
    got = nhwc.generate(["a red circle", "b"], **kw)
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} GroupNorm inputs not NHWC"
    assert np.abs(got - want).max() <= 1e-5


def test_channels_last_refused_for_other_backends(folder):
    with pytest.raises(ValueError, match="torch-backend setting"):
        Pipeline.from_pretrained(folder, backend="onnxruntime", device="cpu", channels_last=True)


@cuda
def test_cuda_channels_last_graph_matches_nchw_eager(folder):
    """NHWC UNet/VAE (the CUDA default) through the Triton kernels inside the captured step and
    the captured text encoder / VAE decode vs NCHW eager, fp16."""
    nhwc = Pipeline.from_pretrained(folder, backend="torch", device="cuda", dtype=torch.float16, channels_last=True)
    nchw = Pipeline.from_pretrained(
        folder, backend="torch", device="cuda", dtype=torch.float16, cuda_graph=False, channels_last=False
    )
    kw = dict(steps=5, height=32, width=48, seed=3, output_type="np")
    a, b = nhwc.generate(["a", "b"], **kw), nchw.generate(["a", "b"], **kw)
    assert np.abs(a - b).max() <= 1e-2  # fp16: convolutions sum in another order
