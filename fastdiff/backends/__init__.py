"""Backends run the three networks (text encoder, UNet, VAE decoder) for `Pipeline`.

The contract is `fastdiff.backends.base.Backend`. A backend is one file with a Backend subclass
and one line in REGISTRY, imported on first use (onnxruntime and tensorrt are optional packages).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from fastdiff.backends.base import Backend

REGISTRY = {  # `backend=` name -> "module:class"
    "torch": "fastdiff.backends.torch_backend:TorchBackend",
    "onnxruntime": "fastdiff.backends.ort_backend:OnnxRuntimeBackend",
    "tensorrt": "fastdiff.backends.trt_backend:TensorRTBackend",
}
BACKENDS = ("auto", *REGISTRY)

log = logging.getLogger("fastdiff")


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(
    name: str,
    root: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    kernels: str | None = None,
    channels_last: bool | None = None,
) -> Backend:
    """Build the backend `name` for the diffusers-format model folder `root`.

    "onnxruntime" uses a matching export from the cache, exporting first when there is none.
    "tensorrt" likewise builds fp16 engines for the model's default size (minutes, once per GPU).
    "auto" is the torch backend (`pick_auto` says why): name onnxruntime or tensorrt to use an export.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        name = pick_auto()
        log.info("fastdiff: backend auto -> %s", name)
    if channels_last is None:  # NHWC convolutions measured faster on CUDA; not on CPU
        channels_last = device.type == "cuda" and name == "torch"
    if channels_last and name != "torch":
        raise ValueError(f"channels_last=True is a torch-backend setting; backend={name!r} picks its own layouts")
    return backend_class(name).create(root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)


def pick_auto() -> str:
    """The backend "auto" means: torch, on every device and whatever the cache holds.

    auto used to take onnxruntime or tensorrt when an export was cached, which changed the sizes a
    call accepts (the exported UNet takes latent sides in multiples of 2 ** (down blocks - 1), an
    engine only its profile's sizes) and the code that ran, depending on the cache. It never picks
    a backend that narrows what the model accepts; ask for onnxruntime or tensorrt by name (faster
    on some machines: `python benchmarks/latency.py` measures yours)."""
    return "torch"
