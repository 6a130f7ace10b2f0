"""LoRA adapters against diffusers' load_lora_weights (PEFT) on the same random-weight model:
both layouts (diffusers/PEFT and kohya), UNet and text encoder, two adapters with weights; the
base weights restored bit for bit; a swap under the captured step (no recapture); swaps racing
generations and calls with their own `lora=` racing (each image is one adapter's, never a mix);
onnxruntime and OpenVINO on adapted exports; bad adapters named before any change."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdiff import lora, testing
from fastdiff.pipeline import Pipeline
from fastdiff.weights import read_configs

pytest.importorskip("peft")

H, W = 32, 48
RUN = dict(steps=4, guidance_scale=7.5, height=H, width=W, scheduler="dpmpp_2m", output_type="np")
PROMPTS = ["a red circle on the left", "a photo of a cat"]

# Modules of test model "a" given updates: attention projections, the feed-forward, a 1x1 proj_in,
# a 3x3 resnet conv (LoCon), and the text encoder's attention and MLP.
UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
]
TEXT_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"]
# diffusers 0.42's kohya converter renames text-encoder attention layers to `..._lora.up/down`,
# keys transformers 5's CLIPTextModel no longer has (its load report lists them as unexpected and
# drops them): the reference would run without them, so the kohya adapter adapts the MLP only.
KOHYA_TEXT_MODULES = ["text_model.encoder.layers.1.mlp.fc1"]


def _pairs(pipe, seed: int, rank: int, text_modules=TEXT_MODULES):
    """{(target, module): (down, up)} random low-rank factors sized to `pipe`'s weights."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for target, names in (("unet", UNET_MODULES), ("text_encoder", text_modules)):
        for name in names:
            w = pipe.backend.network(target).get_submodule(name).weight  # [out, in(, k, k)]
            kernel = tuple(w.shape[2:])
            down = torch.randn((rank, w.shape[1], *kernel), generator=g) * 0.3
            up = torch.randn((w.shape[0], rank, *((1, 1) if kernel else ())), generator=g) * 0.3
            out[target, name] = (down.contiguous(), up.contiguous())
    return out


def write_kohya(path, pairs, alpha: float):
    tensors = {}
    for (target, name), (down, up) in pairs.items():
        stem = ("lora_unet_" if target == "unet" else "lora_te_") + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = down
        tensors[f"{stem}.lora_up.weight"] = up
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


def write_peft(path, pairs, metadata: dict | None = None):
    """diffusers' layout; `metadata`: its `lora_adapter_metadata` (PEFT's LoraConfig per target)."""
    import json

    tensors = {}
    for (target, name), (down, up) in pairs.items():
        tensors[f"{target}.{name}.lora_A.weight"] = down
        tensors[f"{target}.{name}.lora_B.weight"] = up
    extra = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)} if metadata else None
    save_file(tensors, str(path), metadata=extra)
    return path


# The PEFT adapter's alphas come from its metadata, as diffusers' save_lora_weights writes them:
# lora_alpha per network, and one module's own alpha through alpha_pattern.
PEFT_METADATA = {
    "unet.r": 3, "unet.lora_alpha": 6, "unet.alpha_pattern": {"mid_block.attentions.0.proj_in": 1.5},
    "unet.target_modules": UNET_MODULES,
    "text_encoder.r": 3, "text_encoder.lora_alpha": 4,
    "text_encoder.target_modules": [m.removeprefix("text_model.") for m in TEXT_MODULES],
}  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("lora")
    folder = testing.build_random_folder(root / "a", "a", seed=21, sd15_layout=False)
    ours = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    kohya = write_kohya(root / "style.safetensors", _pairs(ours, 1, rank=4, text_modules=KOHYA_TEXT_MODULES), alpha=2.0)
    peft = write_peft(root / "detail.safetensors", _pairs(ours, 2, rank=3), PEFT_METADATA)
    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.scheduler = DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    return folder, ours, ref, kohya, peft


def _ref_images(ref, seed):
    return ref(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
               generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip


def test_two_adapters_match_diffusers(setup):
    folder, ours, ref, kohya, peft = setup
    seed = int(torch.randint(0, 2**31, ()).item())
    base = ours.generate(PROMPTS, seed=seed, **RUN)
    ref.load_lora_weights(str(kohya), adapter_name="style")
    ref.load_lora_weights(str(peft), adapter_name="detail")
    try:
        for weights in ((0.8, 0.4), (1.0, 0.0), (0.0, -0.7)):
            ref.set_adapters(["style", "detail"], adapter_weights=list(weights))
            want = _ref_images(ref, seed)
            ours.set_adapters({kohya: weights[0], peft: weights[1]})
            got = ours.generate(PROMPTS, seed=seed, **RUN)
            err = np.abs(got - want).max()
            assert err <= 1e-4, f"weights {weights}, seed {seed}: max abs {err:.2e}"
            assert np.abs(got - base).max() > 1e-2  # the adapters do change the picture
    finally:
        ref.unload_lora_weights()
        ours.set_adapters(None)


def test_removing_all_restores_the_base_bit_for_bit(setup):
    folder, ours, ref, kohya, peft = setup
    before = {k: v.clone() for net in ("unet", "text_encoder") for k, v in ours.backend.network(net).state_dict().items()}
    want = ours.generate(PROMPTS, seed=3, **RUN)
    ours.set_adapters({kohya: 0.9, peft: 0.5})
    ours.set_adapters({peft: 1.0})  # a swap: the kohya layers go back to base, the PEFT ones re-merged
    ours.set_adapters(None)
    after = {k: v for net in ("unet", "text_encoder") for k, v in ours.backend.network(net).state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(ours.generate(PROMPTS, seed=3, **RUN), want)


def test_swap_keeps_the_captured_step(setup, monkeypatch):
    """Through the captured step's body (static buffers, device step index; run eagerly off CUDA):
    after a swap the same GraphedStep replays the new adapter's output; nothing is recaptured."""
    folder, ours, ref, kohya, peft = setup
    graphed = Pipeline.from_pretrained(folder, backend="torch", device="cpu")
    monkeypatch.setattr(graphed, "_graphs_enabled", lambda: True)
    graphed.generate(PROMPTS, seed=4, **RUN)
    step = next(iter(graphed._graphs.values()))
    captures = graphed.captures
    for adapters in ({kohya: 1.0}, {peft: 0.6, kohya: 0.3}, None):
        graphed.set_adapters(adapters)
        ours.set_adapters(adapters)
        got = graphed.generate(PROMPTS, seed=4, **RUN)
        np.testing.assert_allclose(got, ours.generate(PROMPTS, seed=4, **RUN), atol=1e-6)
    assert graphed.captures == captures and next(iter(graphed._graphs.values())) is step


def test_swaps_racing_generations_never_mix(setup, monkeypatch):
    """One thread swaps between two adapters while two others generate: every image is exactly
    one adapter's (a generation never sees half-merged weights). Each swap here passes through a
    half-merged state for a few milliseconds, which a generation outside the lock would see."""
    import time

    folder, ours, ref, kohya, peft = setup
    run = dict(RUN, steps=2)
    outputs = {}
    for name, adapters in (("style", {kohya: 1.0}), ("detail", {peft: 1.0})):
        ours.set_adapters(adapters)
        outputs[name] = ours.generate(PROMPTS[0], seed=5, **run)
    seen, errors, stop = [], [], threading.Event()
    real = ours.backend.merge

    def slow_merge(layers, weights):
        real(layers[: len(layers) // 2], weights[: len(layers) // 2])  # half merged...
        time.sleep(0.02)
        real(layers, weights)  # ...then whole

    monkeypatch.setattr(ours.backend, "merge", slow_merge)

    def generate():
        try:
            while not stop.is_set():
                seen.append(ours.generate(PROMPTS[0], seed=5, **run))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=generate) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(8):
        ours.set_adapters({kohya: 1.0} if i % 2 else {peft: 1.0})
        time.sleep(0.02)
    stop.set()
    for t in threads:
        t.join()
    ours.set_adapters(None)
    assert not errors and seen
    for image in seen:
        assert any(np.array_equal(image, o) for o in outputs.values())


def test_bad_adapters_are_named_before_any_change(setup, tmp_path):
    folder, ours, ref, kohya, peft = setup
    ours.set_adapters({kohya: 1.0})
    merged = ours.generate(PROMPTS[0], seed=6, **RUN)
    pickled = tmp_path / "a.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(unknown))
    stray = tmp_path / "stray.safetensors"
    save_file({"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 2),
               "lora_unet_no_such_block.lora_up.weight": torch.zeros(2, 2)}, str(stray))  # fmt: skip
    misfit = tmp_path / "misfit.safetensors"
    save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 5),
               "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.zeros(7, 2)}, str(misfit))  # fmt: skip
    cases = [
        ({pickled: 1.0}, "pickled adapters are refused"),
        ({tmp_path / "missing.safetensors": 1.0}, "no such adapter file"),
        ({unknown: 1.0}, r"no LoRA keys of a known layout \(tried: diffusers/PEFT"),
        ({stray: 1.0}, r"2 keys match no module of this model: lora_unet_no_such_block"),
        ({misfit: 1.0}, r"does not fit its weight"),
        ({kohya: float("nan")}, "must be a finite number"),
        ([kohya], "give a dict"),
    ]
    for adapters, match in cases:
        with pytest.raises(ValueError, match=match):
            ours.set_adapters(adapters)
    assert ours.adapters == {str(kohya): 1.0}
    np.testing.assert_array_equal(ours.generate(PROMPTS[0], seed=6, **RUN), merged)
    ours.set_adapters(None)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_exported_backends_with_adapters(setup, exported, cache_root, backend):
    """onnxruntime / OpenVINO run an export of the merged modules (model "a" of the shared export,
    same shapes as this file's): the same images as the torch backend with the same adapters, at
    their float32 text-to-image tolerance; removing them gives the base export's images again."""
    pytest.importorskip(backend)
    folder, ours, ref, kohya, peft = setup
    adapters = {kohya: 0.7, peft: -0.5}
    seed = int(torch.randint(0, 2**31, ()).item())
    torch_pipe = Pipeline.from_pretrained(exported[0], backend="torch", device="cpu", dtype=torch.float32)
    want = torch_pipe.generate(PROMPTS, seed=seed, lora=adapters, **RUN)
    other = Pipeline.from_pretrained(exported[0], backend=backend, device="cpu", dtype=torch.float32)
    assert other.backend.export_dir == exported[1]
    base = other.generate(PROMPTS, seed=seed, **RUN)
    other.set_adapters(adapters)
    got = other.generate(PROMPTS, seed=seed, **RUN)
    assert other.backend.export_dir.name.split("-")[-5] == "lora" and other.adapters == {str(k): w for k, w in adapters.items()}
    assert np.abs(got - want).max() <= 1e-3, f"seed {seed}: max abs {np.abs(got - want).max():.2e}"
    assert np.abs(got - base).max() > 1e-2
    other.set_adapters(None)
    assert other.backend.export_dir == exported[1]
    np.testing.assert_array_equal(other.generate(PROMPTS, seed=seed, **RUN), base)


def test_one_call_lora(setup):
    """`generate(..., lora=)`: the call runs with exactly those adapters, whatever was merged
    before, on a Pipeline and through the module-level one-call API (where no `lora` means none)."""
    import fastdiff

    folder, ours, ref, kohya, peft = setup
    ours.set_adapters({kohya: 0.6})
    want = ours.generate(PROMPTS[0], seed=7, **RUN)
    ours.set_adapters({peft: 1.0})
    np.testing.assert_array_equal(ours.generate(PROMPTS[0], seed=7, lora={kohya: 0.6}, **RUN), want)
    assert ours.adapters == {str(kohya): 0.6}  # kept merged after the call
    np.testing.assert_array_equal(ours.generate(PROMPTS[0], seed=7, **RUN), want)  # None: what is merged
    base = ours.generate(PROMPTS[0], seed=7, lora={}, **RUN)
    assert ours.adapters == {}
    one = dict(model=folder, backend="torch")
    np.testing.assert_allclose(fastdiff.generate(PROMPTS[0], seed=7, lora={kohya: 0.6}, **one, **RUN), want, atol=1e-6)
    np.testing.assert_allclose(fastdiff.generate(PROMPTS[0], seed=7, **one, **RUN), base, atol=1e-6)
    with pytest.raises(ValueError, match="no such adapter file"):
        fastdiff.generate(PROMPTS[0], lora={folder / "missing.safetensors": 1.0}, **one, **RUN)


def test_calls_with_different_lora_race(setup):
    """Threads each generating with their own `lora=` at once: every image is its own adapter's
    (a change is applied and used by its caller before any other change)."""
    folder, ours, ref, kohya, peft = setup
    run = dict(RUN, steps=2)
    choices = {"style": {kohya: 1.0}, "detail": {peft: 1.0}, "none": {}}
    want = {name: ours.generate(PROMPTS[0], seed=8, lora=a, **run) for name, a in choices.items()}
    got, errors = [], []

    def worker(name):
        try:
            for _ in range(3):
                got.append((name, ours.generate(PROMPTS[0], seed=8, lora=choices[name], **run)))
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (*choices, "style")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ours.set_adapters(None)
    assert not errors and len(got) == 12
    for name, image in got:
        np.testing.assert_array_equal(image, want[name], err_msg=name)


def test_swap_benchmark_runs(tmp_path):
    """benchmarks/lora_swap.py on the embedded model: its adapters cover every attention
    projection, and the base copies it reports are those projections' weights."""
    from pathlib import Path
    import json

    bench = testing.load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "lora_swap.py")
    out = tmp_path / "swap.json"
    assert bench.main(["--repeats", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    pipe = Pipeline.from_pretrained(testing.TINY_SHAPES, backend="torch", device="cpu", dtype=torch.float32)
    modules = lora.model_modules(read_configs(pipe.root))
    attention = [(t, n) for t, names in modules.items() for n in names if n.endswith(bench.ATTENTION)]
    size = sum(pipe.backend.network(t).get_submodule(n).weight.numel() * 4 for t, n in attention)
    assert res["layers"] == len(attention) and res["recaptures"] == 0
    assert abs(res["kept_base_mib"] - size / 2**20) < 1e-6
