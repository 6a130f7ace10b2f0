"""The contract between `Pipeline` and a backend: three networks as calls on torch tensors, and
the optional capabilities a backend declares (with defaults here), so the pipeline never probes
for attributes. A backend is one file with a `Backend` subclass plus one line in
`fastdiff.backends.REGISTRY`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch


class Backend(ABC):
    """Runs the text encoder, the UNet and the VAE decoder of one model on one device.

    The scheduler loop and classifier-free guidance are the pipeline's, shared by every backend.
    Calls take and return torch tensors; outputs are on `device` in the backend's dtype.
    """

    name: str  # what `backend=` takes
    device: torch.device
    dtype: torch.dtype

    # Optional capabilities: override where the backend has them.
    device_types: tuple[str, ...] = ("cpu", "cuda")  # the torch device types it runs on
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)  # network dtypes it runs; a default outside them is float32
    capturable: bool = False  # unet() may be captured in a CUDA graph (reads its weights by address)
    kernels: str | None = None  # the ops mode its modules run under: part of a CUDA graph's key
    latent_multiple: int = 1  # latent sides must be multiples of this (an exported UNet's rule)
    static_size: tuple[int, int] | None = None  # the only (height, width) in px it takes, if fixed
    fp32_decode: bool = False  # decode_fp32() exists: the pipeline's retry when an fp16 decode overflows
    encodes_images: bool = False  # encode_image() exists (img2img, inpainting); checked before model work
    merges_lora: bool = False  # merge() exists: LoRA adapters change the weights in place (else create(adapters=) again)

    @classmethod
    def auto_cost(cls, device: torch.device) -> float | None:
        """What `backend="auto"` weighs (lowest wins): None where this backend is no candidate on
        `device`: its package is missing, the device is not one it runs on, or it would narrow
        what a call accepts (fixed or coarser sizes), so auto never changes which calls succeed.
        The default is None: a backend is used when named, until it says otherwise."""
        return None

    @classmethod
    @abstractmethod
    def create(cls, root: Path, *, device: torch.device, dtype: torch.dtype, kernels: str | None = None,
               channels_last: bool = False, adapters: dict[str, float] | None = None) -> "Backend":
        """The backend for the diffusers-format model folder `root`, building what it needs
        (an export, engines) when it is not cached; `adapters` ({path: weight}, checked by
        `fastdiff.lora.check_weights`): LoRA adapters merged into its networks."""

    @abstractmethod
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, 77] int64 -> hidden states [B, 77, D]."""

    @abstractmethod
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """sample [B, 4, h, w], timestep 0-dim, context [B, 77, D] -> noise prediction [B, 4, h, w]."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w], already divided by the scaling factor -> image [B, 3, f h, f w] in about [-1, 1]."""

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar) of the latent Gaussian, [B, 4, H / f, W / f]
        each, float32, unscaled (only where `encodes_images`)."""
        raise NotImplementedError(f"the {self.name} backend has no VAE encoder")

    def merge(self, layers, weights) -> None:
        """Set the networks' weights to base + sum of weights[i] * layers[i]'s updates, in place
        (only where `merges_lora`); empty `layers`: the base weights again."""
        raise NotImplementedError(f"the {self.name} backend takes no LoRA adapters")

    def decode_fp32(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` with a float32 VAE (only where `fp32_decode`)."""
        raise NotImplementedError(f"the {self.name} backend has no fp32 VAE")

    def nonfinite_weight(self, network: str) -> str | None:
        """The first weight of `network` ("text_encoder", "unet", "vae") holding NaN/inf, where the
        backend can tell (the pipeline's NaN guard names it); None otherwise."""
        return None
