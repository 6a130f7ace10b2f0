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
    "openvino": "fastdiff.backends.openvino_backend:OpenVINOBackend",
}
BACKENDS = ("auto", *REGISTRY)

log = logging.getLogger("fastdiff")


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def resolve(name: str, device: torch.device) -> str:
    """`backend=` as a registered name: "auto" picked for the device (ValueError for an unknown name)."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    if name == "auto":
        name = pick_auto(device)
        log.info("fastdiff: backend auto -> %s on %s", name, device)
    return name


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
    "auto" picks by `pick_auto`: today the torch backend, the only one that narrows nothing.
    """
    device = torch.device(device)
    name = resolve(name, device)
    if channels_last is None:  # NHWC convolutions measured faster on CUDA; not on CPU
        channels_last = device.type == "cuda" and name == "torch"
    if channels_last and name != "torch":
        raise ValueError(f"channels_last=True is a torch-backend setting; backend={name!r} picks its own layouts")
    return backend_class(name).create(root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)


def pick_auto(device: torch.device) -> str:
    """The backend "auto" means on `device`: the registered backend with the lowest
    `Backend.auto_cost`. It never depends on the cache, and no candidate narrows what a call
    accepts (an exported UNet takes latent sides in multiples of 2 ** (down blocks - 1), an engine
    only its profile's sizes); name onnxruntime or tensorrt to use an export
    (`python benchmarks/latency.py` measures which is faster on a machine)."""
    costs = {}
    for name in REGISTRY:
        try:
            cost = backend_class(name).auto_cost(device)
        except ImportError:  # an optional package the backend's module needs is missing
            cost = None
        if cost is not None:
            costs[name] = cost
    if not costs:
        raise RuntimeError(f"no backend can run on {device}")
    return min(costs, key=costs.get)
