"""ONNX export: the files against the diffusers / transformers modules (plain onnxruntime, dynamic
sizes), the Optimum layout and manifest, and the cache's failure paths (corrupt, truncated,
interrupted, missing model).

One real export of the tiny model "a" is shared by the tests (and by test_ort_backend.py, through
the content-keyed cache under pytest's base temp folder); the cache tests replace the slow trace
step by a copy of the real files, so their checks still run onnxruntime against torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


from fastdiff import iospec
from fastdiff.export import cache, find_export
from fastdiff.export import onnx_export as ox

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture
def fresh_root(tmp_path, monkeypatch):
    """An empty cache root, set for this test."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------------------------
# the files against the reference modules


B, H, W = 3, 24, 40  # neither the traced (2, 32x32) nor the checked (1, 32x48) size: the axes are dynamic


def _session(path: Path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_unet_matches_diffusers(exported):
    from diffusers import UNet2DConditionModel

    folder, out, _ = exported
    ref = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    sample = torch.randn(B, 4, H // 2, W // 2)
    t = torch.rand(1) * 999
    context = torch.randn(B, 77, ref.config.cross_attention_dim)
    with torch.no_grad():
        expected = ref(sample, t, context).sample.numpy()
    got = _session(out / "unet" / "model.onnx").run(
        ["out_sample"], {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.numpy()}
    )[0]
    assert got.shape == expected.shape == (B, 4, H // 2, W // 2)
    assert np.abs(got - expected).max() <= 1e-4


def test_vae_decoder_matches_diffusers(exported):
    from diffusers import AutoencoderKL

    folder, out, _ = exported
    ref = AutoencoderKL.from_pretrained(folder / "vae").eval()
    z = torch.randn(B, 4, H // 2, W // 2)
    with torch.no_grad():
        expected = ref.decode(z).sample.numpy()
    got = _session(out / "vae_decoder" / "model.onnx").run(["sample"], {"latent_sample": z.numpy()})[0]
    assert got.shape == expected.shape == (B, 3, H, W)
    assert np.abs(got - expected).max() <= 1e-4


def test_vae_encoder_matches_diffusers(exported):
    """latent_parameters are what Optimum's pipelines take: diffusers' DiagonalGaussianDistribution
    built from them has the mean and logvar of diffusers' own encode()."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    folder, out, _ = exported
    ref = AutoencoderKL.from_pretrained(folder / "vae").eval()
    image = torch.rand(B, 3, H, W) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist
    got = _session(out / "vae_encoder" / "model.onnx").run(["latent_parameters"], {"sample": image.numpy()})[0]
    assert got.shape == (B, 8, H // 2, W // 2)
    dist = DiagonalGaussianDistribution(torch.from_numpy(got))
    assert (dist.mean - expected.mean).abs().max() <= 1e-4
    assert (dist.logvar - expected.logvar).abs().max() <= 1e-4


def test_text_encoder_matches_transformers(exported):
    from transformers import CLIPTextModel

    folder, out, _ = exported
    ref = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = torch.randint(0, 49406, (5, 77))
    ids[torch.arange(5), torch.randint(1, 77, (5,))] = ref.config.eos_token_id  # pooling reads the EOT position
    with torch.no_grad():
        expected = ref(ids)
    got = _session(out / "text_encoder" / "model.onnx").run(None, {"input_ids": ids.to(torch.int32).numpy()})
    assert np.abs(got[0] - expected.last_hidden_state.numpy()).max() <= 1e-4
    assert np.abs(got[1] - expected.pooler_output.numpy()).max() <= 1e-4


def test_io_spec_of_the_files(exported):
    """Names, dtypes and dynamic axes in the files are iospec's (Optimum's names)."""
    import onnx

    _, out, _ = exported
    elem = {"int32": onnx.TensorProto.INT32, "float32": onnx.TensorProto.FLOAT, "float": onnx.TensorProto.FLOAT}
    for name, net in iospec.NETWORKS.items():
        g = onnx.load(str(out / name / "model.onnx"), load_external_data=False).graph
        values = {v.name: v for v in list(g.input) + list(g.output)}
        assert [v.name for v in g.input] == [t.name for t in net.inputs]
        assert [v.name for v in g.output] == [t.name for t in net.outputs]
        for t in net.tensors:
            v = values[t.name].type.tensor_type
            assert v.elem_type == elem[t.dtype], t.name
            params = [d.dim_param for d in v.shape.dim]
            assert params == [s if s in iospec.DYNAMIC else "" for s in t.shape], t.name


def test_attention_is_multihead_node(exported):
    """UNet and VAE attention are com.microsoft MultiHeadAttention nodes; CLIP's causal one stays plain."""
    import onnx

    from fastdiff.models.unet import Attention

    folder, out, _ = exported
    unet = ox.load_networks(folder)["unet"]
    ops = {n: [x.op_type for x in onnx.load(str(out / n / "model.onnx")).graph.node] for n in iospec.NETWORKS}
    assert ops["unet"].count("MultiHeadAttention") == sum(isinstance(m, Attention) for m in unet.modules()) > 0
    assert ops["vae_decoder"].count("MultiHeadAttention") == ops["vae_encoder"].count("MultiHeadAttention") == 1
    assert "MultiHeadAttention" not in ops["text_encoder"] and "Softmax" in ops["text_encoder"]
    assert "Softmax" not in ops["unet"]


def test_layout_and_manifest(exported):
    folder, out, _ = exported
    for name in iospec.NETWORKS:
        assert (out / name / "model.onnx").is_file() and (out / name / "config.json").is_file()
    assert json.loads((out / "unet" / "config.json").read_text()) == json.loads((folder / "unet" / "config.json").read_text())
    assert (out / "tokenizer" / "vocab.json").is_file() or (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == index["vae_decoder"] == index["vae_encoder"] == ["diffusers", "OnnxRuntimeModel"]
    assert "vae" not in index

    m = cache.read_manifest(out)
    assert m["key"] == cache.export_key(cache.source_hash(folder), cache.ExportOptions())
    assert out.name.endswith(m["key"][:16])
    assert m["random_weights"] is False and m["options"]["precision"] == "fp32" and m["options"]["static"] is None
    assert set(m["versions"]) >= {"torch", "onnx", "onnxruntime", "tensorrt"}
    for rel, digest in m["files"].items():
        assert cache.file_sha256(out / rel) == digest
    assert set(m["networks"]) == set(iospec.NETWORKS)
    assert all(0 <= n["max_abs_err"] <= 1e-4 for n in m["networks"].values())
    assert m["io"]["unet"]["sample"]["shape"] == ["batch", 4, "latent_height", "latent_width"]
    assert m["io"]["vae_encoder"] == {
        "sample": {"dtype": "float32", "shape": ["batch", 3, "height", "width"]},
        "latent_parameters": {"dtype": "float32", "shape": ["batch", 8, "latent_height", "latent_width"]},
    }


def test_export_without_the_encoder_is_rebuilt(exported, fresh_root, fake_trace):
    """A folder made before the VAE encoder was exported (manifest format 1, no vae_encoder/) is
    not valid, nor is one whose manifest lacks the encoder: both are rebuilt with it."""
    folder = exported[0]
    dst = _copy_to(exported, fresh_root)
    m = cache.read_manifest(dst)
    old = dict(m, format=1)
    cache.write_manifest(dst, old)
    ok, why = cache.validate(dst, m["key"])
    assert not ok and "format 1" in why

    shutil.rmtree(dst / "vae_encoder")
    lacking = dict(m, files={k: v for k, v in m["files"].items() if not k.startswith("vae_encoder/")})
    cache.write_manifest(dst, lacking)
    ok, why = cache.validate(dst, m["key"])
    assert not ok and why == "manifest lacks vae_encoder/model.onnx"
    assert find_export(folder, "fp32") is None

    assert ox.export(folder) == dst
    assert fake_trace == list(iospec.NETWORKS) and "vae_encoder" in fake_trace
    assert cache.validate(dst, m["key"])[0] and (dst / "vae_encoder" / "model.onnx").is_file()


def test_adapter_exports_are_bounded(exported, fresh_root, fake_trace, tmp_path, monkeypatch):
    """Each LoRA adapter set is its own export (keyed by the files' content and weights); past
    FASTDIFF_LORA_EXPORTS the least recently used of the same model go, never the base export.
    (Weight 0: the merged modules equal the base ones, which the faked trace copies; the check
    against torch is skipped here, the other tests run it.)"""
    from fastdiff import testing

    bench = testing.load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "lora_swap.py")
    monkeypatch.setenv("FASTDIFF_LORA_EXPORTS", "2")
    monkeypatch.setattr(ox, "check_network", lambda *a, **k: 0.0)
    base = _copy_to(exported, fresh_root)
    adapters = []
    for seed in range(4):
        adapters.append({tmp_path / f"{seed}.safetensors": 0.0})
        bench.write_adapter(exported[0], next(iter(adapters[-1])), rank=2, seed=seed)
    folders = [ox.export(exported[0], adapters=a) for a in adapters[:2]]
    assert len(set(folders + [base])) == 3 and all("-lora-" in f.name for f in folders)
    assert find_export(exported[0], "fp32", adapters=adapters[0]) == folders[0]  # a reuse: now the newest
    folders.append(ox.export(exported[0], adapters=adapters[2]))
    assert [f.exists() for f in folders] == [True, False, True]  # 1 was the least recently used
    folders.append(ox.export(exported[0], adapters=adapters[3]))
    assert [f.exists() for f in folders] == [False, False, True, True] and base.exists()
    assert find_export(exported[0], "fp32", adapters=adapters[1]) is None
    assert find_export(exported[0], "fp32") == base


def test_find_export(exported, cache_root):
    folder, out, _ = exported
    assert find_export(folder, "fp32") == out
    assert find_export(folder, "fp16") is None
    assert find_export(folder, "fp32", attention="plain") is None
    assert find_export(folder, "fp32", static=cache.Shapes(1, 32, 32)) is None


def test_fp16_static_export(exported, fresh_root):
    """fp16 + static shapes: fixed dims, fp16 I/O (timestep stays float32, ids int32), norms and
    softmax fed through Casts to float32, outputs close to the float32 diffusers UNet."""
    import onnx
    from diffusers import UNet2DConditionModel

    folder = exported[0]
    out = ox.export(folder, precision="fp16", static=cache.Shapes(1, 32, 48), attention="plain")
    assert find_export(folder, "fp16", static=cache.Shapes(1, 32, 48), attention="plain") == out
    assert find_export(folder, "fp16", attention="plain") is None  # the dynamic one is another key

    g = onnx.load(str(out / "unet" / "model.onnx")).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(g.input) + list(g.output)}
    assert dims == {"sample": [2, 4, 16, 24], "timestep": [1], "encoder_hidden_states": [2, 77, 32], "out_sample": [2, 4, 16, 24]}
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output)}
    assert types["timestep"] == onnx.TensorProto.FLOAT and types["sample"] == types["out_sample"] == onnx.TensorProto.FLOAT16
    producer = {o: n for n in g.node for o in n.output}
    sensitive = [n for n in g.node if n.op_type in ("InstanceNormalization", "LayerNormalization", "Softmax")]
    assert sensitive
    for n in sensitive:
        cast = producer[n.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT, n.name

    ref = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    sample, t, context = torch.randn(2, 4, 16, 24), torch.tensor([321.5]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = ref(sample, t, context).sample.numpy()
    got = _session(out / "unet" / "model.onnx").run(
        None, {"sample": sample.half().numpy(), "timestep": t.numpy(), "encoder_hidden_states": context.half().numpy()}
    )[0]
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float32) - expected).max() <= 2e-2 * max(1.0, np.abs(expected).max())
    m = cache.read_manifest(out)
    assert m["io"]["unet"]["sample"] == {"dtype": "float16", "shape": [2, 4, 16, 24]}
    assert m["io"]["vae_decoder"]["latent_sample"]["shape"] == [1, 4, 16, 24]
    # the encoder sees each image once (no CFG rows); fp16 in and out, moments as float32 from the backend
    assert m["io"]["vae_encoder"]["sample"] == {"dtype": "float16", "shape": [1, 3, 32, 48]}
    _encoder_matches_torch_backend(folder, out, torch.float16, batch=1, height=32, width=48, tol=2e-2)


def _encoder_matches_torch_backend(folder, out, dtype, *, batch, height, width, tol):
    """The onnxruntime backend's encode_image on export `out` against the float32 torch backend's,
    on a fresh image: float32 (mean, logvar) on the CPU, within `tol` x max(1, max |reference|)."""
    from fastdiff.backends.ort_backend import OnnxRuntimeBackend
    from fastdiff.backends.torch_backend import TorchBackend

    cpu = torch.device("cpu")
    image = torch.rand(batch, 3, height, width) * 2 - 1
    expected = TorchBackend(folder, device=cpu, dtype=torch.float32).encode_image(image)
    got = OnnxRuntimeBackend(out, device=cpu, dtype=dtype).encode_image(image)
    for what, a, b in zip(("mean", "logvar"), got, expected):
        assert a.dtype == torch.float32 and a.device == cpu and a.shape == b.shape == (batch, 4, height // 2, width // 2)
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"{what}: max abs {err:.2e}"


# ----------------------------------------------------------------------------------------------
# cache behaviour


def _copy_to(exported, root: Path) -> Path:
    """The good export copied into the cache root `root` (same key: same source, options, versions)."""
    out = exported[1]
    dst = root / "exports" / out.name
    shutil.copytree(out, dst)
    return dst


def test_rerun_reuses_the_folder(exported, cache_root, monkeypatch):
    folder, out, _ = exported
    monkeypatch.setattr(ox, "export_network", lambda *a, **k: pytest.fail("re-exported a valid folder"))
    before = (out / "manifest.json").stat().st_mtime_ns
    assert ox.export(folder) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_source_change_changes_the_key(exported, tmp_path):
    folder = exported[0]
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    assert cache.source_hash(copy) == cache.source_hash(folder)  # the key is content, not the path
    cfg = json.loads((copy / "scheduler" / "scheduler_config.json").read_text())
    cfg["beta_end"] = 0.0121
    (copy / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    assert cache.source_hash(copy) != cache.source_hash(folder)


@pytest.mark.parametrize("damage", ["manifest-garbage", "manifest-missing", "truncated-onnx", "flipped-byte", "missing-config"])
def test_damaged_folder_is_detected_and_rebuilt(exported, fresh_root, fake_trace, damage):
    folder = exported[0]
    dst = _copy_to(exported, fresh_root)
    assert find_export(folder, "fp32") == dst
    onnx_file = dst / "unet" / "model.onnx"
    if damage == "manifest-garbage":
        (dst / "manifest.json").write_text('{"format": 1, "key": ')
    elif damage == "manifest-missing":
        (dst / "manifest.json").unlink()
    elif damage == "truncated-onnx":
        data = onnx_file.read_bytes()
        onnx_file.write_bytes(data[: len(data) // 2])
    elif damage == "flipped-byte":  # same size: only the sha256 tells
        data = bytearray(onnx_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        onnx_file.write_bytes(bytes(data))
    else:
        (dst / "vae_decoder" / "config.json").unlink()

    ok, why = cache.validate(dst, cache.read_manifest(exported[1])["key"])
    assert not ok and why
    assert find_export(folder, "fp32") is None

    assert ox.export(folder) == dst  # rebuilt in place
    assert fake_trace == list(iospec.NETWORKS)
    assert find_export(folder, "fp32") == dst
    assert cache.file_sha256(onnx_file) == cache.file_sha256(exported[1] / "unet" / "model.onnx")


def test_interrupted_export_leaves_nothing_valid(exported, fresh_root, fake_trace, monkeypatch):
    folder = exported[0]
    real_check = ox.check_network
    seen = []

    def check_then_die(name, *a, **k):
        seen.append(name)
        if name == "unet":
            raise KeyboardInterrupt  # the user pressing Ctrl-C midway
        return real_check(name, *a, **k)

    monkeypatch.setattr(ox, "check_network", check_then_die)
    with pytest.raises(KeyboardInterrupt):
        ox.export(folder)
    assert seen == ["text_encoder", "unet"]
    exports = fresh_root / "exports"
    assert [p.name for p in exports.iterdir() if not p.name.endswith(".lock")] == []  # no folder, no temp left
    assert find_export(folder, "fp32") is None


def test_killed_export_temp_is_never_used(exported, fresh_root, fake_trace):
    """A temp folder left by a killed exporter (even a complete-looking one) is ignored, then removed."""
    folder, out, _ = exported
    exports = fresh_root / "exports"
    exports.mkdir(parents=True)
    stale = exports / f".tmp-{out.name}-999999-abcd1234"  # pid 999999: not running
    shutil.copytree(out, stale)
    assert find_export(folder, "fp32") is None
    assert ox.export(folder) == exports / out.name
    assert not stale.exists()


def test_failed_check_is_an_error(exported, fresh_root, fake_trace, monkeypatch):
    """Outputs that differ from torch make the export fail; no folder is left to be found."""
    folder = exported[0]
    real_wrap = ox.wrap

    def off_by_a_bit(name, module, configs, precision):
        m = real_wrap(name, module, configs, precision)
        if name != "vae_decoder":
            return m

        class Shifted(torch.nn.Module):
            def forward(self, latent_sample):
                return m(latent_sample) + 0.01

        return Shifted()

    monkeypatch.setattr(ox, "wrap", off_by_a_bit)
    with pytest.raises(ox.ExportError, match="vae_decoder.*differs from the torch module"):
        ox.export(folder)
    assert find_export(folder, "fp32") is None


def test_out_folder(exported, fresh_root, fake_trace, tmp_path):
    """--out DIR: written there (and found there); a folder that is not an export is never replaced."""
    folder = exported[0]
    out = ox.export(folder, out=tmp_path / "onnx-sd")
    assert out == tmp_path / "onnx-sd" and find_export(folder, "fp32", out=out) == out
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a fastdiff export"):
        ox.export(folder, out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_random_export_is_never_found_for_the_real_model(exported, fresh_root):
    folder = exported[0]
    dst = _copy_to(exported, fresh_root)
    m = cache.read_manifest(dst)
    m["random_weights"] = True
    cache.write_manifest(dst, m)
    assert cache.validate(dst, m["key"])[0]
    assert find_export(folder, "fp32") is None
    assert cache.random_source_hash(0) != cache.source_hash(folder)
    assert "random" in cache.folder_name("sd15", cache.ExportOptions(random_weights=True), "0" * 64)


def test_random_weights_only_with_sd15(exported):
    with pytest.raises(ValueError, match="sd15"):
        ox.export(exported[0], random_weights=True)


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_missing_model(fresh_root, tmp_path, capsys):
    from fastdiff.export.__main__ import main

    assert main([str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "not found" in err
    assert not (fresh_root / "exports").exists() or not any((fresh_root / "exports").iterdir())


def test_cli_bad_lora_is_named_before_any_export(fresh_root, exported, tmp_path, capsys):
    from fastdiff.export.__main__ import main

    assert main([str(exported[0]), "--lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such adapter file" in capsys.readouterr().err
    assert not (fresh_root / "exports").exists() or not any((fresh_root / "exports").iterdir())


def test_cli_reports_a_reused_export(exported, cache_root, monkeypatch, capsys):
    from fastdiff.export.__main__ import main

    monkeypatch.setattr(ox, "export_network", lambda *a, **k: pytest.fail("re-exported a valid folder"))
    assert main([str(exported[0])]) == 0
    out = capsys.readouterr().out
    assert str(exported[1]) in out and "unet" in out and "max abs err" in out
