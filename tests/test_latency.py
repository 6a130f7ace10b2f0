"""The latency harness (benchmarks/latency.py) on a tiny random model: every stage measured for
the diffusers reference and each backend, speed-ups paired repeat by repeat, parity filled in,
and the gate failing / passing on thresholds set beyond / below what was measured.
Checks the harness's bookkeeping, never the timings themselves."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdiff import ops, testing

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


latency = testing.load_script(BENCH / "latency.py")
STEPS, REPEATS = 2, 2


@pytest.fixture(scope="module")
def folder():
    """The embedded model (what the CI gate times): its onnxruntime / OpenVINO export is the one
    tests/test_tiny_shapes.py makes, in the run's shared cache."""
    return testing.TINY_SHAPES


def _argv(folder, *extra):
    return ["--model", str(folder), "--steps", str(STEPS), "--height", "32", "--width", "48", "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory, shared_cache):
    """One harness run with a lenient gate; returns its exit status and JSON results."""
    tmp = tmp_path_factory.mktemp("bench")
    gate = tmp / "gate.json"
    gate.write_text(json.dumps({"cpu": {"min_speedup": {"torch": {"end_to_end": 1e-6}}, "min_psnr_db": {"torch": 0.0}}}))
    out = tmp / "results.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(shared_cache))  # each runner's process inherits it
        status = latency.main(
            _argv(folder, "--repeats", str(REPEATS), "--warmup", "1", "--json", str(out), "--gate", str(gate),
                  "--report", str(tmp / "report"))
        )
    return status, json.loads(out.read_text()), tmp


def test_every_stage_measured(run):
    status, res, _ = run
    assert status == 0, res.get("gate")
    assert latency.REF in res["runs"] and "torch" in res["runs"]
    from fastdiff.backends import BACKENDS

    # Every backend, and the OpenVINO peer at both precisions, is either timed or listed as
    # skipped, with a reason.
    peers = {f"{latency.PEER}:fp32", f"{latency.PEER}:bf16"}
    expected = ({latency.REF, latency.DEFAULT, *BACKENDS} - {"auto"}) | peers
    assert set(res["runs"]) | set(res["skipped"]) == expected
    assert all(res["skipped"].values())
    for name, stages in res["runs"].items():
        assert set(stages) == set(latency.STAGES), name
        for stage, s in stages.items():
            assert len(s["values"]) == REPEATS and all(v > 0 and math.isfinite(v) for v in s["values"]), (name, stage)
            assert s["min"] <= s["median"] <= s["max"]
        # The stages are disjoint slices of the call, and the step is the loop over its UNet calls.
        for r in range(REPEATS):
            parts = sum(stages[k]["values"][r] for k in ("text_encoder", "denoise", "vae_decode"))
            assert parts <= stages["end_to_end"]["values"][r] * 1.0001, name
            assert stages["denoise"]["values"][r] / stages["unet_step"]["values"][r] == pytest.approx(STEPS), name


def test_first_calls_and_attention_choices_reported(run, monkeypatch):
    """Each runner's first call (compile, tune, capture) is kept; the auto mode's attention
    choices are listed (none on the CPU, where nothing is timed), one readable line each."""
    _, res, _ = run
    assert set(res["first_call_s"]) == set(res["runs"]) and all(v > 0 for v in res["first_call_s"].values())
    assert res["attention_choice"] == []
    from fastdiff import ops

    key = (torch.Size([2, 8, 4096, 40]), torch.Size([2, 8, 4096, 40]), (1,), (1,), (1,), torch.float16, "cuda", 0.16)
    monkeypatch.setattr(ops, "ATTENTION_CHOICE", {key: ("torch", {"triton": 0.192, "torch": 0.151})})
    assert latency.attention_choices() == ["q [2, 8, 4096, 40] k [2, 8, 4096, 40] float16: torch (triton 192.0 us, torch 151.0 us)"]


def test_each_runner_in_its_own_process(run):
    """On the CPU each runner runs in a process of its own, so the torch backend's allocator
    setting (fastdiff.allocator) stays in fastdiff's rows: diffusers, onnxruntime and the peer run
    on glibc's defaults, as their own users do."""
    from fastdiff import allocator

    _, res, _ = run
    by_runner = res["environment"]["cpu_allocator"]
    assert set(by_runner) == set(res["runs"])
    torch_rows = {latency.DEFAULT, "torch"}
    kept = os.environ.get(allocator.ENV, "keep") == "keep" and platform.libc_ver()[0] == "glibc"
    for name, value in by_runner.items():
        expected = "keep freed memory" if name in torch_rows and kept else "system default"
        assert value == expected, (name, by_runner)


def test_speedups_are_paired(run):
    _, res, _ = run
    ref = res["runs"][latency.REF]
    for backend, stages in res["speedup"].items():
        for stage in latency.STAGES:
            mine = res["runs"][backend][stage]["values"]
            expected = [a / b for a, b in zip(ref[stage]["values"], mine)]
            assert stages[stage]["values"] == pytest.approx(expected, rel=1e-12)
            assert stages[stage]["median"] == pytest.approx(statistics.median(expected), rel=1e-12)


def test_openvino_peer_matches_diffusers_and_is_a_second_reference(run):
    """The peer's own loop (diffusers' modules under OpenVINO f32) gives diffusers' image, and
    every fastdiff runner gets paired ratios against it."""
    pytest.importorskip("openvino")
    _, res, _ = run
    peer = f"{latency.PEER}:fp32"
    assert res["parity"][peer]["max_abs"] <= 1e-3, res["parity"][peer]
    fastdiff_runners = set(res["runs"]) - {latency.REF} - {n for n in res["runs"] if n.startswith(latency.PEER)}
    assert set(res["vs_peer"][peer]) == fastdiff_runners
    for name, r in res["vs_peer"][peer].items():
        for stage, spread in r.items():
            expected = [a / b for a, b in zip(res["runs"][peer][stage]["values"], res["runs"][name][stage]["values"])]
            assert spread["values"] == pytest.approx(expected, rel=1e-12), (name, stage)


def test_parity_and_flops_filled(run):
    _, res, tmp = run
    assert set(res["parity"]) == set(res["runs"]) - {latency.REF}
    for backend, p in res["parity"].items():
        assert all(math.isfinite(p[k]) for k in ("max_abs", "mean_abs", "psnr_db")), backend
        assert p["psnr_db"] > 20, (backend, p)  # same weights and seed: the images must agree
        assert (tmp / "report" / f"{backend}_vs_{latency.REF}.png").exists()
    f = res["flops"]
    assert f["unet_flops_per_step"] > 0 and all(v > 0 for v in f["peak_flops_per_s"].values())
    assert set(f["achieved"]) == set(res["runs"])
    for name, a in f["achieved"].items():  # each runner against the matmul rate of its own dtype
        assert a["fraction_of_peak"] == pytest.approx(a["flops_per_s"] / f["peak_flops_per_s"][a["dtype"]]), name
    assert res["settings"]["steps"] == STEPS and res["environment"]["versions"]["torch"]
    assert (tmp / "report" / "report.md").read_text().count("![") == len(res["parity"])


def test_psnr_formula():
    rng = np.random.default_rng()
    a = rng.random((1, 8, 8, 3), dtype=np.float32)
    b = a + np.float32(0.01)  # MSE 1e-4 -> 40 dB
    p = latency.parity(a, b)
    assert p["psnr_db"] == pytest.approx(40.0, abs=1e-3)
    assert p["max_abs"] == pytest.approx(0.01, rel=1e-4)
    assert latency.parity(a, a)["psnr_db"] == latency.PSNR_CAP_DB


def test_gate_fails_beyond_measured(run, folder, capsys):
    _, res, tmp = run
    backend = "torch"
    got = res["speedup"][backend]["end_to_end"]["median"]
    gate = tmp / "strict.json"
    gate.write_text(json.dumps({
        "_comment": "set beyond what was measured",
        "cpu": {
            "min_speedup": {backend: {"end_to_end": got * 100, "text_encoder": 1e-6}},
            "max_abs": {backend: -1.0},
            "min_psnr_db": {backend: res["parity"][backend]["psnr_db"] + 1e3},
        },
    }))
    capsys.readouterr()
    # The gated backend only (the reference runs anyway): the module's run covers the others.
    argv = _argv(folder, "--repeats", "1", "--warmup", "0", "--gate", str(gate), "--same-process", "--backends", backend, "--peers", "none")
    status = latency.main(argv)
    out = capsys.readouterr().out
    assert status == 1
    assert "for every runner" in out.split("CPU allocator: ")[1].splitlines()[0]  # one process: one allocator
    assert f"min_speedup {backend} end_to_end" in out
    assert f"max_abs {backend}" in out and f"min_psnr_db {backend}" in out
    assert "text_encoder" not in out.split("GATE FAILED")[1]  # the lenient threshold is not named


def test_gate_names_unmeasured_backend(run):
    _, res, _ = run
    gate = {"cpu": {"min_psnr_db": {"tensorrt": 30.0}}}
    missed = latency.check_gate({**res, "skipped": {"tensorrt": "needs a CUDA device"}}, gate)
    assert missed and "tensorrt" in missed[0] and "not measured" in missed[0]


def test_bad_gate_rejected_before_running(tmp_path, folder):
    gate = tmp_path / "bad.json"
    gate.write_text(json.dumps({"cpu": {"min_speedup": {"torch": {"end2end": 1.0}}}}))
    assert latency.main(_argv(folder, "--gate", str(gate))) == 2


def test_project_gate_file_is_valid():
    latency.load_gate(BENCH / "gate.json")


def test_unet_flops_match_diffusers(folder):
    """The meta-device count on fastdiff's UNet equals a count over diffusers' UNet really run."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    args = SimpleNamespace(batch=2, guidance_scale=7.5, height=32, width=48)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x = torch.randn(4, 4, 8, 12)  # CFG batch of 2 images, 32x48 pixels / VAE factor 4
    context = torch.randn(4, 77, unet.config.cross_attention_dim)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: latency._sdpa_cpu_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=custom) as fc:
        unet(x, torch.tensor(500.0), context)
    assert latency.count_unet_flops(folder, args) == fc.get_total_flops() > 0


def test_backend_variants_parse_and_reject_unknown_suffixes():
    """'torch:nograph:torchops' is the torch backend with two settings changed; a typo is refused."""
    assert latency.split_variant("torch") == ("torch", {})
    assert latency.split_variant("torch:nograph:torchops") == ("torch", {"cuda_graph": False, "kernels": "torch"})
    with pytest.raises(ValueError, match="nograf"):
        latency.split_variant("torch:nograf")


# ----------------------------------------------------------------------------------------------
# benchmarks/profile_step.py: kernel names into categories, and its CPU path end to end.

profile_step = testing.load_script(BENCH / "profile_step.py")


def test_profile_categories_of_real_kernel_names():
    """Names as the CUDA profiler reports them (cuDNN, cuBLAS, torch, Triton): each in its bucket,
    first match winning where two patterns apply (cuDNN's flash kernel says 'fprop' too)."""
    names = {
        "_attention_kernel": "attention (triton)",
        "_attention_combine_kernel": "attention (triton)",
        "void at::native::convert_kernel<c10::Half, float>": "other",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention (sdpa)",
        "_group_norm_stats_kernel": "group_norm (triton)",
        "_group_norm_kernel": "group_norm (triton)",
        "void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>": "group_norm (torch)",
        "aten::native_group_norm": "group_norm (torch)",
        "_geglu_kernel": "geglu (triton)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::Half>": "layer_norm",
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128": "convolution",
        "nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN": "matmul",
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64": "matmul",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::Half>>": "other",
        "mkldnn::_linear_pointwise": "matmul",  # the CPU's packed bf16 linears
        "mkldnn::_convolution_pointwise": "convolution",
    }
    assert {n: profile_step.categorize(n) for n in names} == names
    # Every Triton kernel the runtime launches, by its @triton.jit name, in its own bucket.
    for module, category in (("attention", "attention (triton)"), ("group_norm", "group_norm (triton)"), ("geglu", "geglu (triton)")):
        mod = importlib.import_module(f"fastdiff.kernels.{module}")
        jitted = [n for n in dir(mod) if n.endswith("_kernel")]
        assert jitted and {n: profile_step.categorize(n) for n in jitted} == dict.fromkeys(jitted, category)
    agg = profile_step.aggregate([("_attention_kernel", 300.0, 1), ("nvjet_x", 100.0, 1), ("_attention_kernel", 300.0, 1)], 2)
    assert agg["total_ms"] == pytest.approx(0.35)
    assert agg["categories"]["attention (triton)"] == {"ms": pytest.approx(0.3), "launches": 1}
    assert agg["top"][0] == {"name": "_attention_kernel", "ms": pytest.approx(0.3)}


def test_profile_step_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert profile_step.main(["--device", "cpu", "--arch", "tiny", "--size", "64", "--calls", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"auto", "torch"}  # the CPU default and the reference ops
    for result in results.values():
        cats = result["categories"]
        assert {"convolution", "matmul", "attention (sdpa)", "group_norm (torch)"} <= set(cats)
        assert result["total_ms"] == pytest.approx(sum(c["ms"] for c in cats.values()))
    names = {mode: {k["name"] for k in result["top"]} for mode, result in results.items()}
    assert "aten::mkldnn_convolution" in names["torch"]
    if 2 % torch.get_num_threads() == 0:  # batch 2 fills the threads: ops' im2col path (thnn_conv2d)
        assert "aten::_slow_conv2d_forward" in names["auto"]
    assert "convolution" in capsys.readouterr().out


def test_profile_step_vae_decode_on_cpu(tmp_path, capsys):
    """--network vae profiles the decoder of one image: its convolutions and GroupNorms, no
    matmul but the mid-block attention's projections, and the decode's image size in the title."""
    out = tmp_path / "profile.json"
    argv = ["--device", "cpu", "--arch", "tiny", "--network", "vae", "--size", "64", "--calls", "1", "--json", str(out)]
    assert profile_step.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["network"] == "vae"
    for mode, result in record["results"].items():
        categories = set(result["categories"])
        assert {"convolution", "attention (sdpa)"} <= categories
        # "auto" runs the channels-last GroupNorm kernel where the CPU has AVX-512 (ops.group_norm_path)
        assert "group_norm (torch)" in categories if mode == "torch" else categories & {"group_norm (torch)", "group_norm (cpu)"}
    assert "VAE decode tiny, 64x64, batch 1" in capsys.readouterr().out


compiled_cpu = testing.load_script(BENCH / "compiled_cpu.py")


@pytest.mark.parametrize("network, image", [("unet", (16, 16)), ("vae_decode", (64, 64))])
def test_compiled_cpu_inputs_are_the_size_asked_for(network, image):
    """The compiled-forward benchmark (its compiles take minutes, so only its inputs are run here)
    sizes latents by the model's own VAE scale: the embedded VAE scales by 4, and an older script
    that divided by 8 timed that model at half the side it named. The backend's module takes
    them and gives the size asked for."""
    from fastdiff.backends import make_backend

    x = compiled_cpu.inputs(testing.TINY_SHAPES, network, 64, seed=0)
    net = make_backend("torch", testing.TINY_SHAPES, device=torch.device("cpu"), dtype=torch.float32)
    with torch.inference_mode():
        out = net.network("unet")(*x) if network == "unet" else net.network("vae")(*x)
    assert tuple(out.shape[-2:]) == image and tuple(x[0].shape[-2:]) == (16, 16)
    assert out.shape[0] == (2 if network == "unet" else 1)  # a CFG batch; one image


network_dtypes = testing.load_script(BENCH / "network_dtypes.py")


def test_network_dtypes_inputs_fit_each_network():
    """The per-network dtype benchmark (bf16 CPUs only, so not run here) calls each network on
    inputs drawn from its I/O spec (`iospec.call_inputs`): each takes them and gives the rows and
    size of one CFG call at the side asked for."""
    x = network_dtypes.inputs(testing.TINY_SHAPES, 64, seed=0)
    calls = network_dtypes.load(testing.TINY_SHAPES, torch.float32)
    assert set(x) == set(calls) == set(network_dtypes.NETWORKS)
    with torch.inference_mode():
        out = {n: calls[n](*x[n]) for n in network_dtypes.NETWORKS}
    assert out["text_encoder"].shape[:2] == (2, 77) and out["unet"].shape == x["unet"][0].shape
    assert tuple(out["vae_decode"].shape) == (1, 3, 64, 64)


@pytest.mark.parametrize("argv", [["--size", "60"], ["--size", "0"], ["--repeats", "0"], ["--dtype", "float64"]])
def test_compiled_cpu_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        compiled_cpu.parse(argv)
    assert e.value.code == 2


linear_layout_cpu = testing.load_script(BENCH / "linear_layout_cpu.py")


def test_linear_benchmark_shapes_are_the_ones_each_dtype_times():
    """bf16 times a GEGLU projection as the two halves its packed path runs, fp32 at the whole
    width its rule times, and fp32 adds the text encoder (CFG: 2 x 77 tokens): q, k, v as one."""
    bf16, fp32 = (linear_layout_cpu.shapes(256, dtype) for dtype in (torch.bfloat16, torch.float32))
    assert bf16[("unet", 2048, 320, 1280)] == 2 * 5 and ("unet", 2048, 320, 2560) not in bf16
    assert fp32[("unet", 2048, 320, 2560)] == 5 and ("unet", 2048, 320, 1280) not in fp32
    assert fp32[("text", 154, 768, 3 * 768)] == 12 and not any(net == "text" for net, *_ in bf16)
    assert {key: n for key, n in fp32.items() if key[0] == "vae"} == {key: n for key, n in bf16.items() if key[0] == "vae"}


@pytest.mark.skipif(not ops.PACKED_LINEAR, reason="this torch has no oneDNN packed linears")
def test_linear_benchmark_fp32_row(monkeypatch):
    """An fp32 row: both ways timed, the rule's own pick, and the error against float64."""
    monkeypatch.setattr(ops, "FP32_PACKED", {})
    row = linear_layout_cpu.time_shape(6, 16, 24, torch.float32, repeats=1)
    assert row["F.linear ms"] > 0 and row["packed ms"] > 0 and row["error"] < 1e-5
    assert row["rule"] == ("packed" if ops.FP32_PACKED[6, 16, 24, torch.get_num_threads()][0] else "F.linear")


def test_img2img_mode_runs_diffusers_img2img(folder, tmp_path):
    """--strength: both sides start from the same input image; parity with diffusers'
    StableDiffusionImg2ImgPipeline holds only if fastdiff really ran img2img at that strength."""
    out = tmp_path / "img2img.json"
    argv = _argv(folder, "--strength", "0.5", "--backends", "torch", "--peers", "none", "--repeats", "1", "--json", str(out), "--same-process")
    argv[argv.index("--steps") + 1] = "4"  # 2 of the 4 steps run
    assert latency.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["strength"] == 0.5
    assert res["parity"]["torch"]["max_abs"] <= 1e-4, res["parity"]
    assert res["parity"]["torch"]["psnr_db"] > 60


@pytest.mark.parametrize("when", ["before the request", "while answering"])
def test_a_killed_worker_is_named_with_its_status(when):
    """A runner process that dies (the OOM killer's SIGKILL, say) is an error naming the runner and
    the signal, not a BrokenPipeError from deep in the harness."""
    read_first = "sys.stdin.buffer.read(1); " if when == "while answering" else ""
    code = f"import os, signal, sys; {read_first}os.kill(os.getpid(), signal.SIGKILL)"
    runner = object.__new__(latency.Isolated)  # no model: only the process matters here
    runner.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    runner.name = "openvino-peer:fp32"
    if when == "before the request":
        runner.proc.wait()
    with pytest.raises(RuntimeError, match=r"worker of openvino-peer:fp32 exited with status -9 \(SIGKILL"):
        runner()
    assert runner.proc.returncode == -signal.SIGKILL
