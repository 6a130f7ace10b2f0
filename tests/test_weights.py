"""fastdiff.weights: model resolution (folder, hub cache, errors), weights files, strict loading."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import safetensors.torch
import torch
from torch import nn

from fastdiff import testing
from fastdiff import weights as W
from fastdiff.weights import (
    CheckpointMismatchError,
    ModelNotFoundError,
    UnsafeWeightsError,
    find_weights,
    load_module,
    resolve_model,
)

SD15_REPOS = W.MODELS["sd15"].hub_repos


def make_model_folder(folder, components=W.COMPONENTS):
    """A diffusers-format skeleton: model_index.json and the component folders (empty files)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for c in components:
        (folder / c).mkdir(exist_ok=True)
        (folder / c / "config.json").write_text("{}")
    return folder


def make_hub_snapshot(cache, repo, rev, *, main=True, components=W.COMPONENTS):
    """Lay out one snapshot as huggingface_hub does: files are symlinks into blobs/."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / rev
    staged = make_model_folder(cache / "staging" / rev, components)
    for src in sorted(staged.rglob("*")):
        dst = snap / src.relative_to(staged)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            blob = blobs / f"{rev}-{src.relative_to(staged).as_posix().replace('/', '_')}"
            blob.write_bytes(src.read_bytes())
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(os.path.relpath(blob, dst.parent))
    if main:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------------------------
# resolve_model


def test_folder_path(tmp_path):
    folder = make_model_folder(tmp_path / "m")
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder


def test_incomplete_folder_names_what_is_missing(tmp_path):
    folder = make_model_folder(tmp_path / "m", components=("unet", "text_encoder", "tokenizer", "scheduler"))
    with pytest.raises(ModelNotFoundError, match=r"missing vae/"):
        resolve_model(folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model_index\.json"):
        resolve_model(folder)


def test_sd15_found_in_hub_cache_prefers_refs_main(hub):
    main = make_hub_snapshot(hub, SD15_REPOS[0], "a" * 40)
    newer = make_hub_snapshot(hub, SD15_REPOS[0], "b" * 40, main=False)
    t = time.time()
    os.utime(main, (t - 100, t - 100))
    os.utime(newer, (t, t))
    assert resolve_model("sd15") == main
    # refs/main missing: the newest complete snapshot
    (hub / ("models--" + SD15_REPOS[0].replace("/", "--")) / "refs" / "main").unlink()
    assert resolve_model("sd15") == newer


def test_sd15_falls_back_to_second_repo_and_skips_incomplete_snapshots(hub):
    make_hub_snapshot(hub, SD15_REPOS[0], "c" * 40, components=("tokenizer", "scheduler"))  # partial download
    legacy = make_hub_snapshot(hub, SD15_REPOS[1], "d" * 40)
    assert resolve_model("sd15") == legacy


def test_hf_home_used_when_hub_cache_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    snap = make_hub_snapshot(tmp_path / "hfhome" / "hub", SD15_REPOS[1], "e" * 40)
    assert resolve_model("sd15") == snap
    # a hub repo id works too
    assert resolve_model(SD15_REPOS[1]) == snap


def test_missing_model_error_lists_paths_and_how_to_get_it(hub):
    partial = make_hub_snapshot(hub, SD15_REPOS[1], "f" * 40, components=("unet",))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("sd15")
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert str(hub / ("models--" + SD15_REPOS[0].replace("/", "--"))) in msg
    assert str(partial) in msg and "vae/" in msg
    assert f"hf download {SD15_REPOS[0]}" in msg and '--include "*.json"' in msg
    assert "path" in msg


def test_unknown_name_error(tmp_path, hub):
    with pytest.raises(ModelNotFoundError, match="sd15") as e:
        resolve_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_default_is_the_bundled_model(tmp_path, monkeypatch, hub):
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "empty-cache"))  # no export to prefer
    monkeypatch.setattr(W, "ASSETS", tmp_path / "assets")
    with pytest.raises(ModelNotFoundError, match="train_tiny_shapes") as e:
        resolve_model(None)
    assert str(tmp_path / "assets" / "tiny-shapes") in str(e.value)
    folder = make_model_folder(tmp_path / "assets" / "tiny-shapes")
    assert resolve_model(None) == resolve_model("tiny-shapes") == folder


def test_default_model_order(tmp_path, monkeypatch, hub, caplog):
    """model=None: $FASTDIFF_MODEL, else the embedded model, whatever the export cache holds."""
    import json
    import logging
    import os

    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(W, "ASSETS", tmp_path / "assets")
    bundled = make_model_folder(tmp_path / "assets" / "tiny-shapes")
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert resolve_model(None) == bundled
    assert "embedded" in caplog.text

    sources = [make_model_folder(tmp_path / name) for name in ("old", "new", "rand")]
    for i, (src, random) in enumerate(zip(sources, (False, False, True))):
        folder = tmp_path / "cache" / "exports" / f"export-{i}"
        folder.mkdir(parents=True)
        manifest = {"model": {"root": str(src)}, "random_weights": random}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        os.utime(folder / "manifest.json", (1000 + i, 1000 + i))
    (tmp_path / "cache" / "exports" / "export-3").mkdir()
    (tmp_path / "cache" / "exports" / "export-3" / "manifest.json").write_text('{"model": "x"}')  # damaged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        assert resolve_model(None) == bundled  # exports never change (or break) the default
    assert "embedded" in caplog.text

    monkeypatch.setenv("FASTDIFF_MODEL", str(sources[0]))
    assert resolve_model(None) == sources[0]
    monkeypatch.setenv("FASTDIFF_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="missing"):
        resolve_model(None)


def test_resolution_is_offline_and_does_not_import_hub_libraries(hub):
    """In a fresh interpreter with sockets disabled: no huggingface_hub/transformers/diffusers import."""
    snap = make_hub_snapshot(hub, SD15_REPOS[0], "9" * 40)
    code = (
        "import socket, sys\n"
        "def no_net(*a, **k): raise AssertionError('network use')\n"
        "socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = no_net\n"
        "from fastdiff.weights import resolve_model\n"
        "print(resolve_model('sd15'))\n"
        "bad = [m for m in ('huggingface_hub', 'transformers', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=os.environ)
    assert out.stdout.strip() == str(snap)


# ----------------------------------------------------------------------------------------------
# find_weights


def touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_find_weights_prefers_full_precision_safetensors(tmp_path):
    names = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors")
    touch(tmp_path / "u", *names)
    assert find_weights(tmp_path / "u").name == "diffusion_pytorch_model.safetensors"
    touch(tmp_path / "t", "pytorch_model.bin", "model.safetensors")
    assert find_weights(tmp_path / "t").name == "model.safetensors"


def test_find_weights_accepts_lone_fp16_variant(tmp_path):
    touch(tmp_path / "u", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin", "config.json")
    assert find_weights(tmp_path / "u").name == "diffusion_pytorch_model.fp16.safetensors"


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt", "weights.pt"])
def test_pickle_only_folder_refused(tmp_path, name):
    touch(tmp_path / "u", name, "config.json")
    with pytest.raises(UnsafeWeightsError) as e:
        find_weights(tmp_path / "u")
    msg = str(e.value)
    assert name in msg and "execute" in msg and "safetensors" in msg and "weights_only=True" in msg


def test_no_weights_at_all(tmp_path):
    touch(tmp_path / "u", "config.json")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        find_weights(tmp_path / "u")


# ----------------------------------------------------------------------------------------------
# load_module


@dataclass(frozen=True)
class TinyConfig:
    dim: int = 8
    hidden: int = 12


class Block(nn.Module):
    def __init__(self, c: TinyConfig):
        super().__init__()
        self.proj = nn.Linear(c.dim, c.hidden)
        self.norm = nn.LayerNorm(c.hidden)


class Tiny(nn.Module):
    """A stand-in model: attribute names are the checkpoint keys, plus an integer buffer."""

    def __init__(self, c: TinyConfig):
        super().__init__()
        self.embed = nn.Embedding(10, c.dim)
        self.blocks = nn.ModuleList([Block(c) for _ in range(2)])
        self.register_buffer("position_ids", torch.empty(1, 5, dtype=torch.long))

    def forward(self, ids):
        h = self.embed(ids)  # [B, T, dim]
        return self.blocks[1].norm(self.blocks[0].proj(h))


class TinyDroppingObsoleteKey(Tiny):
    """The fastdiff pattern for an obsolete checkpoint entry: the module drops it while loading."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "old_buffer", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class TinyWithInitBuffer(Tiny):
    def __init__(self, c: TinyConfig):
        super().__init__(c)
        self.register_buffer("table", torch.arange(4.0), persistent=False)  # computed in __init__: not allowed


def random_state(config: TinyConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    ref = Tiny(config)
    state = {k: torch.randn(v.shape, dtype=dtype) for k, v in ref.state_dict().items() if v.is_floating_point()}
    state["position_ids"] = torch.randint(0, 77, (1, 5))
    return state


@pytest.mark.parametrize(
    "file_dtype, dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float16)]
)
def test_load_module_values_dtype_and_mode(tmp_path, file_dtype, dtype):
    config = TinyConfig()
    state = random_state(config, file_dtype)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, path)

    m = load_module(Tiny, config, path, device="cpu", dtype=dtype)
    assert not m.training
    for k, v in m.state_dict().items():
        assert v.device.type == "cpu" and not v.requires_grad
        if state[k].is_floating_point():
            assert v.dtype == dtype
            torch.testing.assert_close(v, state[k].to(dtype), rtol=0, atol=0)
        else:
            assert v.dtype == torch.long and torch.equal(v, state[k])
    # and it computes what a module built the ordinary way computes with the same weights
    ref = Tiny(config).to(dtype)
    ref.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    ids = torch.randint(0, 10, (2, 5))
    torch.testing.assert_close(m(ids), ref(ids), rtol=0, atol=0)


def test_load_module_in_inference_mode_gives_ordinary_tensors(tmp_path):
    """A caller inside torch.inference_mode (as many diffusers scripts load) still gets ordinary
    tensors: the CPU ops refresh their packed weight copies by a tensor's version, which an
    inference tensor does not have (a bf16 UNet then failed in its first GroupNorm)."""
    config = TinyConfig()
    state = random_state(config)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, path)
    with torch.inference_mode():
        m = load_module(Tiny, config, path, device="cpu", dtype=torch.bfloat16)
    for k, v in m.state_dict().items():
        assert not v.is_inference(), k
        assert torch.equal(v, state[k].to(torch.bfloat16) if state[k].is_floating_point() else state[k]), k
    weight = next(p for p in m.parameters() if p.is_floating_point())
    before = weight._version  # an in-place change is seen, as a LoRA merge's must be
    with torch.no_grad():
        weight.mul_(2)
    assert weight._version > before


def test_strict_key_mismatch_names_file_and_keys(tmp_path):
    config = TinyConfig()
    state = random_state(config)
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["blocks.1.norm.bias"]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(CheckpointMismatchError) as e:
        load_module(Tiny, config, path, device="cpu", dtype=torch.float32)
    msg = str(e.value)
    assert str(path) in msg and "blocks.1.norm.bias" in msg and "blocks.0.extra.weight" in msg


def test_shape_mismatch_names_key(tmp_path):
    state = random_state(TinyConfig(hidden=16))
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"wrong shape: blocks\.0\.proj\.weight \(file \(16, 8\), module \(12, 8\)\)"):
        load_module(Tiny, TinyConfig(), path, device="cpu", dtype=torch.float32)


def test_keys_dropped_by_the_modules_own_hook_are_not_errors(tmp_path):
    state = random_state(TinyConfig())
    state["old_buffer"] = torch.arange(3)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(state, path)
    m = load_module(TinyDroppingObsoleteKey, TinyConfig(), path, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(m.embed.weight, state["embed.weight"], rtol=0, atol=0)
    with pytest.raises(CheckpointMismatchError, match="old_buffer"):  # without the hook: refused
        load_module(Tiny, TinyConfig(), path, device="cpu", dtype=torch.float32)


def test_buffer_made_in_init_is_reported(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(random_state(TinyConfig()), path)
    with pytest.raises(RuntimeError, match="table"):
        load_module(TinyWithInitBuffer, TinyConfig(), path, device="cpu", dtype=torch.float32)


def test_diffusers_unet_loads_into_fastdiff_unet(tmp_path):
    """A diffusers UNet saved with save_pretrained (safetensors) -> find_weights -> load_module."""
    import diffusers
    from fastdiff.models import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**testing.UNET_A).eval()
    testing.perturb_(ref, 0)  # default init zeroes some output layers: perturb so every weight matters
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)

    weights = find_weights(tmp_path / "unet")
    assert weights.name == "diffusion_pytorch_model.safetensors"
    config = UNetConfig.from_json(tmp_path / "unet" / "config.json")
    m = load_module(UNet2DConditionModel, config, weights, device="cpu", dtype=torch.float32)
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, testing.UNET_A["cross_attention_dim"])
    with torch.no_grad():
        expected = ref(sample, 321, encoder_hidden_states=context).sample
        got = m(sample, 321, context)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sd15_layout_text_encoder_loads_into_fastdiff_clip(tmp_path):
    """The SD1.5 text_encoder/model.safetensors layout: `text_model.` keys plus the old
    `position_ids` entry (transformers 4 wrote both)."""
    import transformers

    from fastdiff.models import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77
    )
    ref = transformers.CLIPTextModel(cfg).eval()
    folder = tmp_path / "text_encoder"
    ref.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if not next(iter(state)).startswith("text_model."):  # transformers 5 saves the keys unprefixed
        state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    safetensors.torch.save_file(state, folder / "model.safetensors")

    config = CLIPTextConfig.from_json(folder / "config.json")
    m = load_module(CLIPTextModel, config, find_weights(folder), device="cpu", dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(m(ids)[0], ref(ids).last_hidden_state, rtol=1e-5, atol=1e-5)
