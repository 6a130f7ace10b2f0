"""Where a model's files are, and loading safetensors weights into fastdiff's modules.

A model is a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), given as a path or as a known name (`MODELS`). Names are looked up offline: in the
Hugging Face hub cache as `huggingface_hub` lays it out (without importing it, and never touching
the network), or inside the package for the embedded model. Only safetensors are read: pickle
checkpoints (.bin, .ckpt, .pt) can execute code when loaded, so they are refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

log = logging.getLogger("fastdiff")

ASSETS = Path(__file__).parent / "assets"

# The folders of a diffusers-format model that fastdiff reads.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass(frozen=True)
class KnownModel:
    """A model name users can pass instead of a path."""

    hub_repos: tuple[str, ...] = ()  # hub repo ids looked for in the local hub cache, in order
    bundled: str | None = None  # folder under fastdiff/assets/ for a model shipped in the package
    how_to_get: str = ""  # what to run to get the files when they are missing


def _hf_download(repo: str) -> str:
    patterns = ("*.json", "*.txt", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors")
    return f"hf download {repo} " + " ".join(f'--include "{p}"' for p in patterns)


# The one place that maps names to where their files come from.
MODELS: dict[str, KnownModel] = {
    "sd15": KnownModel(
        hub_repos=("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5"),
        how_to_get="(once, on a machine with internet) " + _hf_download("stable-diffusion-v1-5/stable-diffusion-v1-5"),
    ),
    "tiny-shapes": KnownModel(
        bundled="tiny-shapes",
        how_to_get="(from a source checkout) python training/train_tiny_shapes.py",
    ),
}
DEFAULT_MODEL = "tiny-shapes"  # model=None: the embedded model, so a fresh install works offline

_FULL = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_FP16 = ("diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")  # file suffixes refused: unpickling runs code


class ModelNotFoundError(FileNotFoundError):
    """A model, one of its folders, or its weights file is not where it was looked for."""


class UnsafeWeightsError(RuntimeError):
    """Only pickle checkpoints were found; fastdiff will not unpickle them."""


class CheckpointMismatchError(RuntimeError):
    """The weights file's keys or shapes do not match the module built from the config."""


class ModelFileError(ValueError):
    """A model file is there but damaged: not valid JSON, not a JSON object, not safetensors."""


def read_config(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; a damaged file raises ModelFileError naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON ({e}); restore the file from the model's source") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: holds a JSON {type(value).__name__}, expected an object; restore the file")
    return value


def read_configs(folder: str | os.PathLike, *, exported: bool = False) -> dict[str, dict]:
    """The three networks' configs, keyed text_encoder / unet / vae: from a diffusers-format model
    folder, or from an export (`exported`: its VAE decoder's folder is vae_decoder/)."""
    folder = Path(folder)
    vae = "vae_decoder" if exported else "vae"
    return {
        "text_encoder": read_config(folder / "text_encoder" / "config.json"),
        "unet": read_config(folder / "unet" / "config.json"),
        "vae": read_config(folder / vae / "config.json"),
    }


# ----------------------------------------------------------------------------------------------
# model resolution


def hub_cache_dir() -> Path:
    """The hub cache folder, chosen as huggingface_hub chooses it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a diffusers-format model fastdiff can load (None: it is one)."""
    if not folder.is_dir():
        return "not there"
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    missing += [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
    return f"missing {', '.join(missing)}" if missing else None


def _snapshots(repo_dir: Path) -> list[Path]:
    """A cached repo's snapshot folders: the one refs/main points to first, then newest first."""
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return []
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snapshots / ref.read_text().strip()
        if main in found:
            found.remove(main)
            found.insert(0, main)
    return found


def _find_in_hub_cache(repos: tuple[str, ...], looked: list[str]) -> Path | None:
    cache = hub_cache_dir()
    for repo in repos:
        repo_dir = cache / ("models--" + repo.replace("/", "--"))
        snapshots = _snapshots(repo_dir)
        if not snapshots:
            looked.append(f"{repo_dir} (not there)" if not repo_dir.exists() else f"{repo_dir} (no snapshots)")
        for snap in snapshots:
            problem = folder_problem(snap)
            if problem is None:
                return snap
            looked.append(f"{snap} ({problem})")
    return None


def default_model() -> Path:
    """What model=None means: $FASTDIFF_MODEL if set, else the embedded model; logs which. Never
    what the export cache holds: a product's default must not change when something is exported,
    nor break when a cache entry is damaged. A product that wants an exported model names it."""
    env = os.environ.get("FASTDIFF_MODEL")
    if env:
        log.info("fastdiff: model=None -> $FASTDIFF_MODEL=%s", env)
        return resolve_model(env)
    log.info("fastdiff: model=None -> %s (the embedded model)", DEFAULT_MODEL)
    return resolve_model(DEFAULT_MODEL)


def resolve_model(model: str | os.PathLike | None = None, config: str | os.PathLike | None = None) -> Path:
    """The diffusers-format folder for a path or a known name (None: `DEFAULT_MODEL`).

    Offline only: names are looked up in the local hub cache or the package, never downloaded.
    A single-file `.safetensors` checkpoint (CompVis/LDM layout) is converted once into a cached
    folder (fastdiff.convert), with the configs of the diffusers folder `config`, else SD1.5's.
    """
    if model is None:
        return default_model()
    if isinstance(model, str) and model in MODELS:
        known, looked = MODELS[model], []
        if known.bundled is not None:
            folder = ASSETS / known.bundled
            problem = folder_problem(folder)
            if problem is None:
                return folder
            looked.append(f"{folder} ({problem})")
        found = _find_in_hub_cache(known.hub_repos, looked)
        if found is not None:
            return found
        raise ModelNotFoundError(
            f"model {model!r} was not found. Looked at:\n"
            + "".join(f"  {p}\n" for p in looked)
            + f"To get it: {known.how_to_get}\n"
            + "then rerun, or pass model=<path to a diffusers-format folder>."
        )

    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() in PICKLES:
        raise ModelNotFoundError(f"model {str(model)!r}: pickled checkpoints are refused (loading one runs code); "
                                 "use its .safetensors file")
    if path.is_file() and path.suffix.lower() == ".safetensors":
        from fastdiff.convert import single_file_folder

        return single_file_folder(path, config)
    if path.is_dir():
        problem = folder_problem(path)
        if problem is not None:
            raise ModelNotFoundError(f"model {str(model)!r}: {path} is not a diffusers-format model folder ({problem})")
        return path
    looked = [f"{path.absolute()} (no such folder)"]
    # "org/name": a hub repo id that may already be in the local cache.
    if isinstance(model, str) and model.count("/") == 1 and not model.startswith((".", "/", "~")):
        found = _find_in_hub_cache((model,), looked)
        if found is not None:
            return found
    names = ", ".join(MODELS)
    raise ModelNotFoundError(
        f"model {str(model)!r} was not found. Looked at:\n"
        + "".join(f"  {p}\n" for p in looked)
        + f"Pass a diffusers-format folder or one of the known names: {names}."
    )


# ----------------------------------------------------------------------------------------------
# weights


def _safetensors_name(pickle_name: str) -> str:
    """diffusion_pytorch_model.bin -> diffusion_pytorch_model.safetensors, pytorch_model.bin -> model.safetensors."""
    stem = pickle_name.rsplit(".", 1)[0]
    return ("model" + stem[len("pytorch_model") :] if stem.startswith("pytorch_model") else stem) + ".safetensors"


def find_weights(subfolder: str | os.PathLike) -> Path:
    """The safetensors file of one component folder (unet/, vae/, text_encoder/).

    Prefers the full-precision file; takes the `.fp16.safetensors` variant only when it is the
    only one there (fp16 -> fp32 loses nothing). Refuses pickles.
    """
    folder = Path(subfolder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: folder not found")
    for name in _FULL:
        if (folder / name).is_file():
            return folder / name
    fp16 = [folder / n for n in _FP16 if (folder / n).is_file()]
    if len(fp16) == 1:
        return fp16[0]

    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    if any(n.endswith(".safetensors.index.json") for n in files):
        raise ModelNotFoundError(f"{folder}: sharded checkpoints are not supported; found {files}")
    pickles = [n for n in files if n.endswith(PICKLES)]
    if pickles:
        src, dst = pickles[0], _safetensors_name(pickles[0])
        raise UnsafeWeightsError(
            f"{folder}: only pickle checkpoints found ({', '.join(pickles)}). fastdiff does not load them: "
            "unpickling a file can execute arbitrary code. Download the .safetensors files instead, "
            "or convert once, in an environment you trust:\n"
            f"  cd {folder} && python -c \"import torch, safetensors.torch as st; "
            f"sd = torch.load('{src}', map_location='cpu', weights_only=True); "
            f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{dst}')\""
        )
    raise ModelNotFoundError(
        f"{folder}: no weights file (looked for {', '.join(_FULL + _FP16)}); the folder holds {files or 'nothing'}"
    )


def unreadable(weights_path, error: Exception) -> ModelFileError:
    return ModelFileError(
        f"{weights_path}: not a readable safetensors file ({error}); the download may be truncated: fetch it again"
    )


def parameter_count(weights_path: str | os.PathLike) -> int:
    """Elements in a safetensors file, from its header alone (no tensor is read); a damaged file
    is the same ModelFileError `load_module` gives."""
    try:
        with safetensors.safe_open(str(weights_path), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict
    except (safetensors.SafetensorError, OSError) as e:
        raise unreadable(weights_path, e) from None


def _key_list(keys: list[str], limit: int = 20) -> str:
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@torch.inference_mode(False)
def load_module(
    cls: type[nn.Module],
    config,
    weights_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """`cls(config)` with the weights of a safetensors file, ready for inference.

    The module is built on the meta device (no memory, no init compute), the tensors are read
    straight to `device`, floating ones cast to `dtype`, and assigned in place of the meta
    parameters. Any key or shape mismatch is an error (the same check as strict=True, with a
    message naming the file): attribute names equal checkpoint keys.

    The tensors are ordinary ones even when the caller is in `torch.inference_mode`: the CPU ops
    keep packed copies of weights and refresh them after an in-place change (a LoRA merge), seen
    by the tensor's version, which an inference tensor does not have.
    """
    weights_path = Path(weights_path)
    with torch.device("meta"):
        module = cls(config)
    try:
        state = safetensors.torch.load_file(weights_path, device=str(torch.device(device)))
    except (safetensors.SafetensorError, OSError) as e:
        raise unreadable(weights_path, e) from None
    for k, v in state.items():  # one tensor at a time, so at most one extra copy is alive
        if v.is_floating_point():
            state[k] = v.to(dtype)

    # Shapes first (load_state_dict stops at the first); then the keys, as load_state_dict reports
    # them after the modules' own _load_from_state_dict hooks (which may drop obsolete entries,
    # such as CLIP's position_ids). strict=False + this check = strict=True with a clearer message.
    expected = module.state_dict()
    problems = [
        f"wrong shape: {k} (file {tuple(state[k].shape)}, module {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    if not problems:
        result = module.load_state_dict(state, strict=False, assign=True)
        if result.missing_keys:
            problems.append(f"missing from the file: {_key_list(sorted(result.missing_keys))}")
        if result.unexpected_keys:
            problems.append(f"not in {cls.__name__}: {_key_list(sorted(result.unexpected_keys))}")
    if problems:
        raise CheckpointMismatchError(
            f"{weights_path} does not match {cls.__name__}({type(config).__name__}):\n  " + "\n  ".join(problems)
        )

    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(
            f"{cls.__name__}: {_key_list(left)} still on the meta device after loading {weights_path}: "
            "non-persistent buffers made in __init__ are not in the checkpoint; compute them in forward"
        )
    return module.eval().requires_grad_(False)
