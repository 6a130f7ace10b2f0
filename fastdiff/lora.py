"""LoRA adapters: read from .safetensors in the two layouts people publish, merged in place.

Layouts (both address modules by their diffusers / transformers names, which are fastdiff's own
module names, so no key table is needed):
  diffusers / PEFT  `unet.<module>.lora_A.weight` / `lora_B.weight` (or the older
                    `<module>.lora.down.weight` / `lora.up.weight`), text encoder under
                    `text_encoder.`; optional `<module>.alpha`
  kohya             `lora_unet_<module with _ for .>.lora_down.weight` / `lora_up.weight` /
                    `.alpha`, text encoder `lora_te_...`

A layer's update is W += weight * (alpha / rank) * up @ down (a 1x1 up and a k x k down for
convolutions). The torch backend adds the sum of the active adapters to the base weights in their
own storage (`fastdiff.backends.torch_backend.TorchBackend.merge`), so a captured CUDA graph, which
reads weights by address, stays valid and replays the new adapter's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

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
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable .safetensors adapter ({e})") from None
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
        alpha = float(g["alpha"]) if "alpha" in g else float(rank)
        layers.append(LoraLayer(target, module, g["down"], g["up"], alpha / rank))
    return layers


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
