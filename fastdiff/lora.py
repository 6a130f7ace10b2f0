"""LoRA adapters: read from .safetensors in the two layouts people publish, merged in place.

Layouts (both address modules by their diffusers / transformers names, which are fastdiff's own
module names, so no key table is needed):
  diffusers / PEFT  `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older
                    `<module>.lora.down.weight` / `lora.up.weight`), text encoder under
                    `text_encoder.`; optional `<module>.alpha`
  kohya             `lora_unet_<module with _ for .>.lora_down.weight` / `lora_up.weight` /
                    `.alpha`, text encoder `lora_te_...`

A layer's update is W += weight * (alpha / rank) * up @ down (a 1x1 up and a k x k down for
convolutions). alpha comes from the layer's `alpha` key, else from the file's
`lora_adapter_metadata` (what diffusers' `save_lora_weights` writes: `<target>.lora_alpha` and
`<target>.alpha_pattern`), else it is the rank (scale 1, PEFT's convention).

Where the sum is merged: the torch backend adds it to the base weights in their own storage
(`merge` below, called by `TorchBackend.merge`), so a captured CUDA graph, which reads weights by
address, stays valid and replays the new adapter's output. The exported backends (onnxruntime,
OpenVINO, TensorRT) get an export of the merged modules, keyed by the adapters' content
(`content_hash`), so their weights stay constants their runtimes pre-pack (README, "LoRA").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

TARGETS = ("unet", "text_encoder")
LAYOUTS = ("diffusers/PEFT (lora_A/lora_B, lora.down/lora.up)", "kohya (lora_unet_/lora_te_ ... lora_down/lora_up)")


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: W[out, in(, k, k)] += scale * up[out, r(, 1, 1)] @ down[r, in(, k, k)]."""

    target: str  # "unet" | "text_encoder"
    module: str  # the module's name in that network (a Linear or a Conv2d)
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The float32 weight update for a weight of `shape`."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # [out, r], [r, in * k * k]
        return (up @ down).reshape(shape) * self.scale


def read_adapter(path: str | Path, modules: dict[str, set[str]]) -> list[LoraLayer]:
    """The layers of the adapter file at `path`; `modules`: {target: names of its Linear / Conv2d
    modules}. A ValueError names the file for a pickled file, an unknown layout, or keys that match
    no module (listing them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fastdiff.weights import PICKLES

    path = Path(path)
    if path.suffix.lower() in PICKLES:
        raise ValueError(f"{path}: pickled adapters are refused (loading one runs code); use its .safetensors file")
    if not path.is_file():
        raise ValueError(f"{path}: no such adapter file")
    try:
        tensors = load_file(str(path))
        metadata = _adapter_metadata(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable .safetensors adapter ({e})") from None
    if any(metadata.get(f"{t}.use_dora") for t in TARGETS):
        raise ValueError(f"{path}: a DoRA adapter (use_dora in its metadata); only plain LoRA merges as a low-rank sum")
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        groups, unmatched = _kohya_groups(tensors, modules)
    elif any(".lora_A." in k or ".lora.down." in k for k in tensors):
        groups, unmatched = _diffusers_groups(tensors, modules)
    else:
        raise ValueError(f"{path}: no LoRA keys of a known layout (tried: {'; '.join(LAYOUTS)})")
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:5]) + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        raise ValueError(f"{path}: {len(unmatched)} keys match no module of this model: {shown}")
    layers = []
    for (target, module), g in sorted(groups.items()):
        if "down" not in g or "up" not in g:
            raise ValueError(f"{path}: {target} {module} has only its {'up' if 'up' in g else 'down'} matrix")
        rank = g["down"].shape[0]
        alpha = float(g["alpha"]) if "alpha" in g else _metadata_alpha(metadata, target, module, rank)
        layers.append(LoraLayer(target, module, g["down"], g["up"], alpha / rank))
    return layers


def _adapter_metadata(path: Path) -> dict:
    """The file's `lora_adapter_metadata` (diffusers' PEFT LoraConfig per target, keys
    `unet.lora_alpha`, `text_encoder.alpha_pattern`, ...), or {}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return json.loads(raw) if raw else {}


def _metadata_alpha(metadata: dict, target: str, module: str, rank: int) -> float:
    """alpha for `module` from PEFT's config: the longest `alpha_pattern` entry that names the
    module or a suffix of it at a dot, else `lora_alpha`, else the rank."""
    pattern = metadata.get(f"{target}.alpha_pattern") or {}
    names = (module, module.removeprefix("text_model."))
    hits = [k for k in pattern if any(n == k or n.endswith("." + k) for n in names)]
    if hits:
        return float(pattern[max(hits, key=len)])
    return float(metadata.get(f"{target}.lora_alpha", rank))


def _kohya_groups(tensors: dict, modules: dict[str, set[str]]):
    """{(target, module): {"down", "up", "alpha"}} and the keys that match nothing, for kohya's
    layout: module names with "_" for ".", resolved against the model's own names."""
    flat = {prefix: {name.replace(".", "_"): name for name in modules[target]}
            for prefix, target in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"))}  # fmt: skip
    parts = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
    groups, unmatched = {}, []
    for key, value in tensors.items():
        prefix = next((p for p in flat if key.startswith(p)), None)
        stem, _, part = key.partition(".")
        name = flat[prefix].get(stem[len(prefix):]) if prefix else None
        if name is None or part not in parts:
            unmatched.append(key)
            continue
        target = "unet" if prefix == "lora_unet_" else "text_encoder"
        groups.setdefault((target, name), {})[parts[part]] = value
    return groups, unmatched


def _diffusers_groups(tensors: dict, modules: dict[str, set[str]]):
    """The same for diffusers' / PEFT's layout (`unet.` / `text_encoder.` prefixes; a text encoder
    module may be named with or without transformers' `text_model.` prefix)."""
    parts = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
             ".lora.up.weight": "up", ".alpha": "alpha"}  # fmt: skip
    groups, unmatched = {}, []
    for key, value in tensors.items():
        target, _, rest = key.partition(".")
        suffix = next((s for s in parts if rest.endswith(s)), None)
        name = rest[: -len(suffix)] if suffix else None
        if target in modules and name is not None:
            names = modules[target]
            name = name if name in names else next((n for n in (f"text_model.{name}",) if n in names), None)
        if target not in modules or name is None:
            unmatched.append(key)
            continue
        groups.setdefault((target, name), {})[parts[suffix]] = value
    return groups, unmatched


def check_weights(adapters) -> dict[str, float]:
    """`adapters` ({path: weight}, or None / {} for none) with the paths as str and the weights
    as finite floats; a ValueError names a bad entry."""
    import math
    import numbers

    if adapters is None:
        return {}
    if not isinstance(adapters, dict):
        raise ValueError(f"adapters: give a dict {{path: weight}} (or None to remove all), got {type(adapters).__name__}")
    out = {}
    for path, weight in adapters.items():
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"adapters: the weight of {path} must be a finite number, got {weight!r}")
        out[str(path)] = float(weight)
    return out


def from_cli(values: list[str] | None) -> dict[str, float]:
    """`--lora PATH[=WEIGHT]` options (weight 1.0 when left out) as {path: weight}."""
    out = {}
    for value in values or ():
        path, eq, weight = value.rpartition("=")
        if not eq:
            path, weight = value, "1"
        try:
            out[path] = float(weight)
        except ValueError:
            raise ValueError(f"--lora {value!r}: give PATH or PATH=WEIGHT with a number as WEIGHT") from None
    return check_weights(out)


def read_adapters(adapters: dict[str, float], modules: dict[str, set[str]]) -> tuple[list[LoraLayer], list[float]]:
    """Every layer of the checked `adapters` ({path: weight}) and each layer's weight, every file
    read and checked first (ValueErrors name the file)."""
    read = {path: read_adapter(path, modules) for path in adapters}
    layers = [layer for path in adapters for layer in read[path]]
    return layers, [adapters[path] for path in adapters for _ in read[path]]


def module_names(networks: dict[str, nn.Module]) -> dict[str, set[str]]:
    """{target: names of its Linear / Conv2d modules}, the modules a LoRA may adapt."""
    kinds = (nn.Linear, nn.Conv2d)
    return {t: {n for n, m in networks[t].named_modules() if isinstance(m, kinds)} for t in TARGETS}


def model_networks(configs: dict) -> dict[str, nn.Module]:
    """The networks a LoRA adapts, {target: module}, for a model with these configs
    (`fastdiff.weights.read_configs`), on the meta device: names and shapes, no weights read."""
    from fastdiff.models import CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig

    with torch.device("meta"):
        return {"unet": UNet2DConditionModel(UNetConfig.from_dict(configs["unet"])),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))}  # fmt: skip


def model_modules(configs: dict) -> dict[str, set[str]]:
    """`module_names` of `model_networks(configs)`: what adapters are checked against before any
    export or merge."""
    return module_names(model_networks(configs))


@torch.no_grad()
def merge(networks: dict[str, nn.Module], layers, weights, base: dict) -> None:
    """Set each adapted weight of `networks` ({target: module}) to base + sum of weights[i] *
    layers[i]'s update, summed in float32, rounded once to the weight's dtype and copied into the
    weight's own storage. `base` ({(target, module): tensor}) keeps each weight as it was before its
    first update, so weights adapted before and not now go back to it bit for bit. Every update's
    shape is checked before any weight changes."""
    deltas: dict[tuple[str, str], list] = {}
    for layer, w in zip(layers, weights):
        weight = networks[layer.target].get_submodule(layer.module).weight
        if layer.up.shape[0] != weight.shape[0] or layer.down.flatten(1).shape[1] != weight[0].numel():
            raise ValueError(f"LoRA layer {layer.target} {layer.module}: an update of shape [{layer.up.shape[0]}, "
                             f"{layer.down.flatten(1).shape[1]}] does not fit its weight {tuple(weight.shape)}")
        deltas.setdefault((layer.target, layer.module), []).append((layer, w))
    for key in set(base) | set(deltas):  # every check passed: nothing half-merged
        weight = networks[key[0]].get_submodule(key[1]).weight
        kept = base.setdefault(key, weight.detach().clone())
        total = kept.float()
        for layer, w in deltas.get(key, ()):
            total = total + w * layer.delta(weight.shape).to(total.device)
        weight.copy_(total.to(weight.dtype) if key in deltas else kept)


def content_hash(adapters: dict[str, float]) -> str:
    """sha256 over each adapter file's sha256 and weight, in order (the merge sums in that order):
    part of an export's key, so a changed file or weight is a different export."""
    from fastdiff.export.cache import file_sha256

    blob = json.dumps([[file_sha256(Path(p)), w] for p, w in adapters.items()])
    return hashlib.sha256(blob.encode()).hexdigest()
