"""Single-file checkpoints in the original CompVis/LDM key layout, converted to a diffusers-format
folder (fastdiff's own module names) once, cached by content hash.

This module holds the project's one key table: LDM names -> diffusers names, per block kind
(UNet resnet / attention / down- and upsampler / middle block / time embedding, VAE resnet /
attention / samplers, CLIP text encoder). Block indices follow from the UNet and VAE configs (a
given diffusers folder's, else SD1.5's). EMA copies (`model_ema.`) and the diffusion schedule
buffers (`betas`, `alphas_cumprod`, ...) are not model weights and are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fastdiff import sd15

VERSION = 1  # bump when the conversion's output changes: part of the cache key
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
LAYOUTS = ("CompVis/LDM single file (model.diffusion_model., first_stage_model., cond_stage_model.transformer.)",)

# LDM ResBlock -> diffusers ResnetBlock2D (UNet), and the VAE's own names.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}  # fmt: skip
VAE_TOP = {"norm_out": "conv_norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}


def _sub(table: dict, rest: str) -> str | None:
    """`rest` with its leading module name (one or two dotted parts) renamed by `table`."""
    for k, v in table.items():
        if rest.startswith(k + "."):
            return v + rest[len(k) :]
    return None


def unet_key(key: str, cfg: dict) -> str | None:
    """The diffusers name of an LDM UNet key (without its prefix), or None if it has none."""
    top = _sub(UNET_TOP, key)
    if top is not None:
        return top
    layers, n = cfg["layers_per_block"], len(cfg["block_out_channels"])
    kind, _, rest = key.partition(".")
    index, _, rest = rest.partition(".")
    part, _, rest = rest.partition(".")
    if kind == "input_blocks" and index.isdigit():
        block, layer = divmod(int(index) - 1, layers + 1)
        if layer == layers:  # the block's downsampler: input_blocks.i.0.op
            return f"down_blocks.{block}.downsamplers.0.conv{rest[2:]}" if part == "0" and rest.startswith("op.") else None
        if part == "0":
            sub = _sub(UNET_RESNET, rest)
            return f"down_blocks.{block}.resnets.{layer}.{sub}" if sub else None
        return f"down_blocks.{block}.attentions.{layer}.{rest}" if part == "1" and "CrossAttn" in cfg["down_block_types"][block] else None
    if kind == "middle_block" and index in ("0", "1", "2"):
        whole = f"{part}.{rest}"
        if index == "1":
            return f"mid_block.attentions.0.{whole}"
        sub = _sub(UNET_RESNET, whole)
        return f"mid_block.resnets.{int(index) // 2}.{sub}" if sub else None
    if kind == "output_blocks" and index.isdigit():
        block, layer = divmod(int(index), layers + 1)
        attention = "CrossAttn" in cfg["up_block_types"][block]
        if part == "0":
            sub = _sub(UNET_RESNET, rest)
            return f"up_blocks.{block}.resnets.{layer}.{sub}" if sub else None
        if part == "1" and attention:
            return f"up_blocks.{block}.attentions.{layer}.{rest}"
        if part == ("2" if attention else "1") and layer == layers and block < n - 1 and rest.startswith("conv."):
            return f"up_blocks.{block}.upsamplers.0.{rest}"
    return None


def vae_key(key: str, cfg: dict) -> str | None:
    """The diffusers name of an LDM VAE key (without its prefix), or None if it has none."""
    n = len(cfg["block_out_channels"])
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return None
    top = _sub(VAE_TOP, rest)
    if top is not None:
        return f"{coder}.{top}"
    parts = rest.split(".")
    if parts[0] == "mid" and len(parts) > 2:
        if parts[1] in ("block_1", "block_2"):
            sub = _sub(VAE_RESNET, ".".join(parts[2:]))
            return f"{coder}.mid_block.resnets.{int(parts[1][-1]) - 1}.{sub}" if sub else None
        if parts[1] == "attn_1":
            sub = _sub(VAE_ATTENTION, ".".join(parts[2:]))
            return f"{coder}.mid_block.attentions.0.{sub}" if sub else None
    if parts[0] in ("down", "up") and len(parts) > 3 and parts[1].isdigit():
        level = int(parts[1]) if coder == "encoder" else n - 1 - int(parts[1])  # LDM's decoder counts up from the bottom
        blocks = "down_blocks" if coder == "encoder" else "up_blocks"
        if parts[2] == "block" and parts[3].isdigit():
            sub = _sub(VAE_RESNET, ".".join(parts[4:]))
            return f"{coder}.{blocks}.{level}.resnets.{parts[3]}.{sub}" if sub else None
        if parts[2] in ("downsample", "upsample") and parts[3] == "conv":
            sampler = "downsamplers" if coder == "encoder" else "upsamplers"
            return f"{coder}.{blocks}.{level}.{sampler}.0.conv.{'.'.join(parts[4:])}"
    return None


def text_key(key: str) -> str | None:
    """The transformers name of an LDM text-encoder key (its prefix already dropped)."""
    return None if key.endswith("position_ids") else f"text_model.{key}"


def convert(state: dict[str, torch.Tensor], configs: dict[str, dict], source: str = "the checkpoint") -> dict[str, dict]:
    """{"unet" / "vae" / "text_encoder": {diffusers name: tensor}} from an LDM state dict; a
    ValueError names the file when its keys match no known layout, or lists keys left unmapped."""
    if not any(k.startswith(UNET_PREFIX) for k in state):
        raise ValueError(f"{source}: no UNet keys of a known single-file layout (tried: {'; '.join(LAYOUTS)})")
    out: dict[str, dict] = {"unet": {}, "vae": {}, "text_encoder": {}}
    unmapped = []
    for key, value in state.items():
        if key.startswith(UNET_PREFIX):
            net, name = "unet", unet_key(key[len(UNET_PREFIX) :], configs["unet"])
        elif key.startswith(VAE_PREFIX):
            net, name = "vae", vae_key(key[len(VAE_PREFIX) :], configs["vae"])
            if name is not None and ".mid_block.attentions.0.to_" in name and name.endswith("weight") and value.ndim == 4:
                value = value[:, :, 0, 0]  # LDM's 1x1 conv attention projections: [C, C, 1, 1] -> [C, C]
        elif key.startswith(TEXT_PREFIXES[1]):
            prefix = TEXT_PREFIXES[0] if key.startswith(TEXT_PREFIXES[0]) else TEXT_PREFIXES[1]
            net, name = "text_encoder", text_key(key[len(prefix) :])
            if key.endswith("position_ids"):
                continue
        else:
            continue  # model_ema.*, schedule buffers: not weights of the three networks
        if name is None:
            unmapped.append(key)
        else:
            out[net][name] = value
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        raise ValueError(f"{source}: {len(unmapped)} keys have no place in the configured model: {shown}")
    missing = [net for net, d in out.items() if not d]
    if missing:
        raise ValueError(f"{source}: holds no {' / '.join(missing)} weights; a single file must hold all three networks")
    return out


def configs_from(folder: str | os.PathLike | None) -> dict[str, dict]:
    """The configs of a diffusers folder (unet, vae, text_encoder, scheduler, model_index), else SD1.5's."""
    from fastdiff.weights import read_config

    if folder is None:
        return {**sd15.SD15_CONFIGS, "scheduler": sd15.SD15_SCHEDULER,
                "model_index": {"_class_name": "StableDiffusionPipeline"}}  # fmt: skip
    folder = Path(folder)
    files = {"unet": "unet/config.json", "vae": "vae/config.json", "text_encoder": "text_encoder/config.json",
             "scheduler": "scheduler/scheduler_config.json", "model_index": "model_index.json"}  # fmt: skip
    return {k: read_config(folder / f) for k, f in files.items()}


def single_file_folder(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Path:
    """The diffusers-format folder made from the single-file checkpoint `path` (configs from the
    diffusers folder `config`, else SD1.5's; the tokenizer from the embedded CLIP vocabulary),
    under $FASTDIFF_CACHE/single-file/ keyed by the sha256 of the file, the configs and VERSION.
    Made once, written to a temporary folder and renamed: never half-written."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from fastdiff.export.cache import cache_root, file_sha256  # the hash memoised per (path, size, mtime)
    from fastdiff.weights import ASSETS

    path = Path(path)
    configs = configs_from(config)
    key = hashlib.sha256(json.dumps({"file": file_sha256(path), "configs": configs, "version": VERSION},
                                    sort_keys=True).encode()).hexdigest()[:32]  # fmt: skip
    out = cache_root() / "single-file" / key
    if (out / "model_index.json").is_file():
        return out
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable .safetensors checkpoint ({e})") from None
    networks = convert(state, configs, str(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        weights = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                   "text_encoder": "model.safetensors"}  # fmt: skip
        for net, tensors in networks.items():
            (tmp / net).mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / net / weights[net]))
            (tmp / net / "config.json").write_text(json.dumps(configs[net], indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
        shutil.copytree(ASSETS / "clip-tokenizer", tmp / "tokenizer")
        index = dict(configs["model_index"], _name_or_path=path.name)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))  # last: marks the folder complete
        try:
            os.replace(tmp, out)
        except OSError:  # another process made it first: theirs is the same content
            if not (out / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
