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
    "auto" takes the fastest backend that is ready without a build step:
      CUDA: tensorrt (engines cached) > onnxruntime-cuda (export cached) > torch;
      CPU:  onnxruntime when a matching export is already cached, else torch.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    device = torch.device(device)
    if channels_last is None:  # NHWC convolutions measured faster on CUDA; not on CPU
        channels_last = device.type == "cuda" and name in ("auto", "torch")
    if channels_last and name not in ("auto", "torch"):
        raise ValueError(f"channels_last=True is a torch-backend setting; backend={name!r} picks its own layouts")
    if name == "auto":
        name = _pick_auto(root, device, dtype)
        log.info("fastdiff: backend auto -> %s", name)
        if channels_last and name != "torch":
            log.info("fastdiff: channels_last applies to the torch backend only; %s picks its own layouts", name)
            channels_last = False
    if name == "torch":
        from fastdiff.backends.torch_backend import TorchBackend

        return TorchBackend(root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)
    if name == "onnxruntime":
        from fastdiff.backends.ort_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(_onnx_export(root, dtype, attention="mha", create=True), device=device, dtype=dtype)
    from fastdiff.backends.trt_backend import TensorRTBackend

    return TensorRTBackend.from_model(root, device=device, dtype=dtype, create=True)


def _precision(dtype: torch.dtype) -> str:
    precisions = {torch.float32: "fp32", torch.float16: "fp16"}
    if dtype not in precisions:
        raise ValueError(f"dtype={dtype}: ONNX exports are float32 or float16")
    return precisions[dtype]


def _onnx_export(root: Path, dtype: torch.dtype, *, attention: str, create: bool) -> Path | None:
    """The cached dynamic export of `root` for `dtype`; made (and logged) when missing and `create`."""
    precision = _precision(dtype)
    try:
        from fastdiff.export.cache import find_export

        found = find_export(root, precision, attention=attention)
    except ImportError:  # onnx / onnxruntime not installed (the optional "onnx" extra)
        if create:
            raise
        return None
    if found is not None or not create:
        return found
    from fastdiff.export.onnx_export import export

    log.info("fastdiff: no %s ONNX export of %s in the cache: exporting (once; takes minutes for SD1.5)", precision, root)
    return export(root, precision=precision, attention=attention)


def _pick_auto(root: Path, device: torch.device, dtype: torch.dtype) -> str:
    if dtype not in (torch.float32, torch.float16):
        return "torch"
    if device.type == "cuda":
        from fastdiff.backends.trt_backend import TensorRTBackend
        from fastdiff.backends.ort_backend import cuda_provider_available

        if dtype == torch.float16 and TensorRTBackend.ready(root):
            return "tensorrt"
        if cuda_provider_available() and _onnx_export(root, dtype, attention="mha", create=False):
            return "onnxruntime"
        return "torch"
    # CPU: onnxruntime was measured faster than torch (SD1.5 UNet, 512 px, CFG batch 2, 2 cores:
    # 15.9 s against 22.0 s per step), but exporting takes minutes: only a cached export is used.
    return "onnxruntime" if _onnx_export(root, dtype, attention="mha", create=False) else "torch"
