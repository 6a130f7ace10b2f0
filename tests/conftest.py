"""Shared test fixtures: small model configs (diffusers / transformers constructor kwargs) and the
SD1.5 configs, written out here so no download is needed."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from fastdiff import sd15, testing

# Tests never read or write the user's cache, nor follow their default-model setting. Each process
# (the controller and every pytest-xdist worker) gets its own, removed when its session ends.
TEST_CACHE = tempfile.mkdtemp(prefix="fastdiff-test-cache-")
os.environ["FASTDIFF_CACHE"] = TEST_CACHE
os.environ.pop("FASTDIFF_MODEL", None)

# Exports that several test files need of one model (tiny model "a", the embedded model) go to one
# folder for the whole run instead: the controller (or the only process) makes it before any worker
# starts, the pytest-xdist workers inherit its path, and the export's own lock
# (fastdiff.export.cache.locked) makes a second asker wait and reuse the first one's export. Only
# tests that ask for the shared_cache, model_a or exported fixtures below write there; each
# process's FASTDIFF_CACHE stays its own. The process that made the folder removes it.
SHARED_OWNER = not (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("FASTDIFF_TEST_SHARED"))
if SHARED_OWNER:
    os.environ["FASTDIFF_TEST_SHARED"] = tempfile.mkdtemp(prefix="fastdiff-test-shared-")
SHARED = Path(os.environ["FASTDIFF_TEST_SHARED"])

# The networks run float32 on every CPU, so parity holds against float32 references whether or not
# this CPU has bf16 instructions (where it does, bf16 would be the default); tests of the dtype
# rule and of bf16 unset it (tests/test_precision.py).
os.environ["FASTDIFF_DTYPE"] = "float32"

# Without CUDA, every Triton kernel in this run goes through Triton's CPU interpreter. Set here,
# once, before any test imports fastdiff.kernels (@triton.jit reads it then, and again at each
# launch), so the mode does not depend on which test modules are collected. Tests that need
# compiled kernels run them in a child process with TRITON_INTERPRET=0.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share this machine's cores: each runs torch on its share, so that
# N workers' OpenMP threads (which spin while they wait) do not outnumber the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

# The two small UNets of fastdiff.testing (they differ in every dimension the model code reads:
# depth, widths, heads as int vs per-block list, context width, groups, eps, projections, time
# embedding); "b" here also has out_channels != in_channels, which the model code must not assume.
UNET_SMALL = {"a": testing.UNET_A, "b": dict(testing.UNET_B, out_channels=5)}
VAE_SMALL = testing.SMALL_VAE

# eos_token_id == 2 is the legacy SD1.5 value (pool at argmax of ids); the other pools at the
# first eos; there eos is not the largest id, so the two rules pick different tokens.
# max_position_embeddings > the test sequence length.
CLIP_SMALL = {
    "eos2": dict(
        vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
        pad_token_id=1,
    ),
    "eos_last": dict(
        vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
        max_position_embeddings=20, hidden_act="gelu", layer_norm_eps=1e-6, bos_token_id=149, eos_token_id=150,
        pad_token_id=150,
    ),
}

# SD1.5's configs live once, in fastdiff.sd15 (as the files hold them); here as constructor kwargs.
SD15_UNET = {k: v for k, v in sd15.SD15_UNET.items() if not k.startswith("_")}
SD15_VAE = {k: v for k, v in sd15.SD15_VAE.items() if not k.startswith("_")}
SD15_CLIP = {k: v for k, v in sd15.SD15_TEXT_ENCODER.items() if k not in ("architectures", "model_type")}


@pytest.fixture(params=sorted(UNET_SMALL))
def unet_small(request) -> dict:
    return dict(UNET_SMALL[request.param])


@pytest.fixture
def vae_small() -> dict:
    return dict(VAE_SMALL)


@pytest.fixture(params=sorted(CLIP_SMALL))
def clip_small(request) -> dict:
    return dict(CLIP_SMALL[request.param])


@pytest.fixture
def perturb():
    """testing.perturb_ at 0.05: reference inits zero some layers (conv_out, proj_out...) and would
    hide bugs behind them."""
    return functools.partial(testing.perturb_, scale=0.05)


def shared_model(name: str, arch: str, seed: int, **kwargs) -> Path:
    """testing.build_random_folder(SHARED/models/name, ...), built once per run: the first asker
    builds it under a lock into a temp folder and renames it into place."""
    from fastdiff.export import cache

    folder = SHARED / "models" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(folder.parent / f".{name}.lock"):
        if not folder.is_dir():
            tmp = folder.parent / f".tmp-{name}-{os.getpid()}"
            testing.build_random_folder(tmp, arch, seed=seed, **kwargs)
            os.replace(tmp, folder)
    return folder


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """The FASTDIFF_CACHE root of the exports shared by the whole run (set it for the export)."""
    return SHARED / "cache"


@pytest.fixture(scope="session")
def model_a() -> Path:
    """Tiny model "a" (seed 3, as save_pretrained writes it): the model of the shared export."""
    return shared_model("tiny-sd-a", "a", seed=3, sd15_layout=False)


@pytest.fixture(scope="session")
def exported(model_a, shared_cache):
    """(model folder, export folder, cache root) for tiny model "a", fp32, dynamic axes, MHA
    attention: exported once per run, shared by the export, backend, LoRA and editing tests.
    Read-only: a test that damages or changes an export works on a copy (fresh_root)."""
    pytest.importorskip("onnxruntime")
    from fastdiff.export import onnx_export

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(shared_cache))
        out = onnx_export.export(model_a)
    return model_a, out, shared_cache


@pytest.fixture
def cache_root(exported, monkeypatch):
    """The shared export's cache root, set for this test."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(exported[2]))
    return exported[2]


@pytest.fixture
def fake_trace(exported, monkeypatch):
    """Replace the slow trace step of an export by a copy of the shared export's file (the rest of
    the export, its checks included, runs); counts the calls."""
    from fastdiff.export import onnx_export

    good = exported[1]
    calls = []

    def copy_network(name, module, configs, path, options):
        calls.append(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good / name / "model.onnx", path)
        return {"seconds": 0.0, "weight_bytes": 0, "external_data": False, "fp32_islands": 0, "mha_nodes": 0}

    monkeypatch.setattr(onnx_export, "export_network", copy_network)
    return calls


# benchmarks/device_check.sh sets FASTDIFF_FAILURE_LOG: each failure's report is appended there
# the moment it arrives (with pytest-xdist, in the controller), so a run killed at its time limit
# still leaves the tracebacks of what failed before.
_FAILURE_LOG = os.environ.get("FASTDIFF_FAILURE_LOG")


def pytest_unconfigure(config):
    # Leave nothing in the temp folder: runs used to leave one cache per process behind. The shared
    # folder goes with the process that made it (the controller ends after every worker).
    shutil.rmtree(TEST_CACHE, ignore_errors=True)
    if SHARED_OWNER:
        shutil.rmtree(SHARED, ignore_errors=True)


def pytest_runtest_logreport(report):
    # With pytest-xdist both the worker and the controller see each report: write from one.
    if _FAILURE_LOG and report.failed and not os.environ.get("PYTEST_XDIST_WORKER"):
        with open(_FAILURE_LOG, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n")
