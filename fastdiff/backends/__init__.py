"""Backends that run the three networks (text encoder, UNet, VAE decoder) for `Pipeline`.

Each backend object has `name`, `device`, `dtype` and three calls:
  encode_text(input_ids [B, 77] int64)            -> [B, 77, D]
  unet(sample [B, 4, h, w], t 0-dim, context)     -> [B, 4, h, w]
  decode(latents [B, 4, h, w], already unscaled)  -> [B, 3, H, W] in about [-1, 1]
so the scheduler loop and classifier-free guidance are shared code in `fastdiff.pipeline`.
"""

from __future__ import annotations

from pathlib import Path

import torch

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def make_backend(name: str, root: Path, *, device: torch.device, dtype: torch.dtype, kernels: str | None = None):
    """Build the backend `name` for the diffusers-format model folder `root`."""
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    if name in ("auto", "torch"):
        from fastdiff.backends.torch_backend import TorchBackend

        return TorchBackend(root, device=device, dtype=dtype, kernels=kernels)
    raise NotImplementedError(f"backend={name!r} is not available yet in this build")
