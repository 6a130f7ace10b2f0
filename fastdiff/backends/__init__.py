"""Backends that run the three networks (text encoder, UNet, VAE decoder) for `Pipeline`.

Each backend object has `name`, `device`, `dtype` and three calls:
  encode_text(input_ids [B, 77] int64)            -> [B, 77, D]
  unet(sample [B, 4, h, w], t 0-dim, context)     -> [B, 4, h, w]
  decode(latents [B, 4, h, w], already unscaled)  -> [B, 3, H, W] in about [-1, 1]
so the scheduler loop and classifier-free guidance are shared code in `fastdiff.pipeline`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")

log = logging.getLogger("fastdiff")


def make_backend(
    name: str,
    root: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    kernels: str | None = None,
    channels_last: bool | None = None,
):
    """Build the backend `name` for the diffusers-format model folder `root`.

    "onnxruntime" uses a matching export from the cache, exporting first when there is none.
    "tensorrt" likewise builds fp16 engines for the model's default size (minutes, once per GPU).
    "auto" is the torch backend (`pick_auto` says why): name onnxruntime or tensorrt to use an export.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    device = torch.device(device)
    if channels_last is None:  # NHWC convolutions measured faster on CUDA; not on CPU
        channels_last = device.type == "cuda" and name in ("auto", "torch")
    if channels_last and name not in ("auto", "torch"):
        raise ValueError(f"channels_last=True is a torch-backend setting; backend={name!r} picks its own layouts")
    if name == "auto":
        name = pick_auto()
        log.info("fastdiff: backend auto -> %s", name)
        if channels_last and name != "torch":
            log.info("fastdiff: channels_last applies to the torch backend only; %s picks its own layouts", name)
            channels_last = False
    if name == "torch":
        from fastdiff.backends.torch_backend import TorchBackend

        return TorchBackend(root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)
    if name == "onnxruntime":
        from fastdiff.backends.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(_onnx_export(root, dtype, attention="mha"), device=device, dtype=dtype)
    from fastdiff.backends.trt_backend import TensorRTBackend

    return TensorRTBackend.from_model(root, device=device, dtype=dtype, create=True)


def _precision(dtype: torch.dtype) -> str:
    precisions = {torch.float32: "fp32", torch.float16: "fp16"}
    if dtype not in precisions:
        raise ValueError(f"dtype={dtype}: ONNX exports are float32 or float16")
    return precisions[dtype]


def _onnx_export(root: Path, dtype: torch.dtype, *, attention: str) -> Path:
    """The cached dynamic export of `root` for `dtype`; made (and logged) when missing."""
    from fastdiff.export.cache import find_export

    precision = _precision(dtype)
    found = find_export(root, precision, attention=attention)
    if found is not None:
        return found
    from fastdiff.export.onnx_export import export

    log.info("fastdiff: no %s ONNX export of %s in the cache: exporting (once; takes minutes for SD1.5)", precision, root)
    return export(root, precision=precision, attention=attention)


def pick_auto() -> str:
    """The backend "auto" means: torch, on every device and whatever the cache holds.

    auto used to take onnxruntime or tensorrt when an export was cached, which changed the sizes a
    call accepts (the exported UNet takes latent sides in multiples of 2 ** (down blocks - 1), an
    engine only its profile's sizes) and the code that ran, depending on the cache. It never picks
    a backend that narrows what the model accepts; ask for onnxruntime or tensorrt by name (faster
    on some machines: `python benchmarks/latency.py` measures yours)."""
    return "torch"
