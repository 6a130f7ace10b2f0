"""Single-file (CompVis/LDM layout) checkpoints: built here from random diffusers models by the
inverse conversion written in this file, then read by fastdiff (fastdiff.convert) and by
diffusers' StableDiffusionPipeline.from_single_file(path, config=folder); the two must agree
per block kind, and their pictures at the text-to-image tolerance."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdiff import convert, iospec, testing
from fastdiff.pipeline import Pipeline

H, W = 32, 48


def ldm_unet_key(name: str, cfg: dict) -> str:
    """diffusers UNet name -> LDM name (the inverse of fastdiff.convert, written independently)."""
    L = cfg["layers_per_block"]
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for k, v in top.items():
        if name.startswith(k + "."):
            return v + name[len(k):]
    p = name.split(".")
    if p[0] == "mid_block":
        if p[1] == "attentions":
            return "middle_block.1." + ".".join(p[3:])
        return f"middle_block.{2 * int(p[2])}.{res[p[3]]}." + ".".join(p[4:])
    block = int(p[1])
    if p[0] == "down_blocks":
        if p[2] == "downsamplers":
            return f"input_blocks.{(block + 1) * (L + 1)}.0.op." + ".".join(p[5:])
        index = 1 + block * (L + 1) + int(p[3])
        if p[2] == "resnets":
            return f"input_blocks.{index}.0.{res[p[4]]}." + ".".join(p[5:])
        return f"input_blocks.{index}.1." + ".".join(p[4:])
    attention = "CrossAttn" in cfg["up_block_types"][block]
    if p[2] == "upsamplers":
        return f"output_blocks.{block * (L + 1) + L}.{2 if attention else 1}.conv." + ".".join(p[5:])
    index = block * (L + 1) + int(p[3])
    if p[2] == "resnets":
        return f"output_blocks.{index}.0.{res[p[4]]}." + ".".join(p[5:])
    return f"output_blocks.{index}.1." + ".".join(p[4:])


def ldm_vae_key(name: str, cfg: dict) -> str:
    n = len(cfg["block_out_channels"])
    p = name.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return name
    coder, rest = p[0], p[1:]
    res = {"conv_shortcut": "nin_shortcut"}
    if rest[0] == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(rest[1:])
    if rest[0] in ("conv_in", "conv_out"):
        return f"{coder}." + ".".join(rest)
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{coder}.mid.block_{int(rest[2]) + 1}.{res.get(rest[3], rest[3])}." + ".".join(rest[4:])
        attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[rest[3]]
        tail = rest[5:] if rest[3] == "to_out" else rest[4:]
        return f"{coder}.mid.attn_1.{attn}." + ".".join(tail)
    level = int(rest[1]) if coder == "encoder" else n - 1 - int(rest[1])
    kind = "down" if coder == "encoder" else "up"
    if rest[2] == "resnets":
        return f"{coder}.{kind}.{level}.block.{rest[3]}.{res.get(rest[4], rest[4])}." + ".".join(rest[5:])
    return f"{coder}.{kind}.{level}.{kind}sample.conv." + ".".join(rest[5:])


def write_single_file(ref, path, ema: bool = True):
    """The LDM single file of a diffusers pipeline (EMA copies and schedule buffers included, as
    published checkpoints hold them)."""
    unet_cfg, vae_cfg = dict(ref.unet.config), dict(ref.vae.config)
    state = {}
    for k, v in ref.unet.state_dict().items():
        state[convert.UNET_PREFIX + ldm_unet_key(k, unet_cfg)] = v.contiguous()
    for k, v in ref.vae.state_dict().items():
        if ".mid_block.attentions.0.to_" in k and k.endswith("weight"):
            v = v[:, :, None, None]  # LDM's 1x1 conv projections
        state[convert.VAE_PREFIX + ldm_vae_key(k, vae_cfg)] = v.contiguous()
    for k, v in ref.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else f"text_model.{k}"
        state["cond_stage_model.transformer." + k] = v.contiguous()
    if ema:
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.diffusion_modelconv_in_weight"] = state[convert.UNET_PREFIX + "input_blocks.0.0.weight"].clone()
        state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module", params=["a", "b"])
def case(request, tmp_path_factory, model_a):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp(f"single-{request.param}")
    # "a" is the run's shared model: the single-file export below reuses its export's files.
    folder = model_a
    if request.param != "a":
        folder = testing.build_random_folder(root / "model", request.param, seed=31, sd15_layout=False)
    ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    path = write_single_file(ref, root / "model.safetensors")
    single = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), torch_dtype=torch.float32)
    single.scheduler = DPMSolverMultistepScheduler.from_config(single.scheduler.config)
    single.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTDIFF_CACHE", str(root / "cache"))
        ours = Pipeline.from_pretrained(path, backend="torch", device="cpu", config=folder)
    return folder, path, single, ours, ref


KINDS = ["conv_in", "time_embedding", "down_blocks.0.resnets", "down_blocks.0.attentions", "downsamplers",
         "mid_block.resnets", "mid_block.attentions", "up_blocks.1.resnets", "up_blocks.1.attentions", "upsamplers",
         "conv_norm_out", "conv_out"]  # fmt: skip
VAE_KINDS = ["encoder.down_blocks", "encoder.mid_block.attentions", "decoder.up_blocks.0", "decoder.mid_block.resnets",
             "downsamplers", "upsamplers", "quant_conv", "conv_norm_out"]  # fmt: skip


BLOCKS = [("unet", kind) for kind in KINDS] + [("vae", kind) for kind in VAE_KINDS]


@pytest.mark.parametrize("network,kind", BLOCKS)
def test_block_kinds_match_diffusers(case, network, kind):
    """Each block kind's tensors, converted by fastdiff, equal diffusers' from_single_file ones."""
    folder, path, single, ours, ref = case
    theirs = single.unet if network == "unet" else single.vae
    mine = ours.backend.unet_model if network == "unet" else ours.backend.vae
    want = {k: v for k, v in theirs.state_dict().items() if kind in k}
    got = {k: v for k, v in mine.state_dict().items() if kind in k}
    assert want and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_text_encoder_matches_diffusers(case):
    folder, path, single, ours, ref = case
    want = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in single.text_encoder.state_dict().items()}
    got = ours.backend.text_encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_pictures_match_from_single_file(case):
    folder, path, single, ours, ref = case
    seed = int(torch.randint(0, 2**31, ()).item())
    want = single(["a red circle", "a cat"], num_inference_steps=4, guidance_scale=7.5, height=H, width=W,
                  generator=torch.Generator().manual_seed(seed), output_type="np").images  # fmt: skip
    got = ours.generate(["a red circle", "a cat"], steps=4, height=H, width=W, seed=seed, output_type="np")
    assert np.abs(got - want).max() <= 1e-4, f"seed {seed}"


def test_converted_once_and_cached(case, tmp_path, monkeypatch):
    folder, path, single, ours, ref = case
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    first = convert.single_file_folder(path, folder)
    stamp = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert convert.single_file_folder(path, folder) == first
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]
    other = tmp_path / "other-config"
    shutil.copytree(folder, other)
    sched = other / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert convert.single_file_folder(path, other) != first  # other configs, another key


def test_bad_files_are_named(tmp_path):
    from fastdiff.weights import ModelNotFoundError, resolve_model

    odd = tmp_path / "odd.safetensors"
    save_file({"model.weight": torch.zeros(2)}, str(odd))
    with pytest.raises(ValueError, match=r"odd\.safetensors: no UNet keys of a known single-file layout \(tried: CompVis/LDM"):
        convert.single_file_folder(odd)
    stray = tmp_path / "stray.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
               "model.diffusion_model.no_such.weight": torch.zeros(2)}, str(stray))  # fmt: skip
    with pytest.raises(ValueError, match=r"1 keys have no place in the configured model: model\.diffusion_model\.no_such"):
        convert.single_file_folder(stray)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="pickled checkpoints are refused"):
        resolve_model(pickled)


@pytest.mark.parametrize("case", ["a"], indirect=True)  # one export is enough
def test_export_takes_a_single_file(case, tmp_path, monkeypatch, fake_trace):
    """`python -m fastdiff.export model.safetensors --config folder`: the ONNX export of the
    converted folder, whose pipeline gives the torch backend's picture. The trace step copies the
    shared export of the same weights (fake_trace); the export's own check of every file against
    the modules converted from the single file runs, as does the comparison of pictures."""
    from fastdiff.export.__main__ import main

    folder, path, single, ours, ref = case
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    assert main([str(path), "--config", str(folder)]) == 0
    assert fake_trace == list(iospec.NETWORKS)  # a new export (the single file's key), every network checked
    onnx = Pipeline.from_pretrained(path, backend="onnxruntime", device="cpu", config=folder)
    kw = dict(steps=3, height=H, width=W, seed=4, output_type="np")
    assert np.abs(onnx.generate("a red circle", **kw) - ours.generate("a red circle", **kw)).max() <= 1e-3
