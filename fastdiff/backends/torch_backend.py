"""The torch backend: fastdiff's own modules, loaded from a diffusers-format folder."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fastdiff import allocator, lora, ops
from fastdiff.backends.base import Backend
from fastdiff.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig
from fastdiff.weights import find_weights, load_module, read_configs


class TorchBackend(Backend):
    """Runs the three networks with plain PyTorch modules (plus the ops seam's kernels)."""

    name = "torch"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    fp32_decode = True
    encodes_images = True
    merges_lora = True

    @classmethod
    def auto_cost(cls, device: torch.device) -> float | None:
        """A candidate wherever torch runs, at cost 1: it takes every size the model takes."""
        return 1.0

    @classmethod
    def create(cls, root, *, device, dtype, kernels=None, channels_last=False, adapters=None) -> "TorchBackend":
        backend = cls(root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)
        if adapters:
            backend.merge(*lora.read_adapters(adapters, lora.model_modules(read_configs(root))))
        return backend

    def __init__(
        self,
        root: Path,
        *,
        device: torch.device,
        dtype: torch.dtype,
        kernels: str | None = None,
        channels_last: bool = False,
    ):
        self.device, self.dtype, self.kernels = device, dtype, kernels
        if device.type == "cpu":
            allocator.keep_freed_memory()  # process-wide, once: see fastdiff.allocator
        self.capturable = device.type == "cuda"  # unet() may be captured in a CUDA graph
        # channels_last: conv weights and the UNet/VAE activations in NHWC memory order (cuDNN's
        # native layout for fp16 tensor-core convolutions); results are the same function.
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._vae_fp32 = None
        self.base_weights: dict[tuple[str, str], torch.Tensor] = {}  # (network, module) -> the weight before any adapter
        self.text_encoder = _load(CLIPTextModel, CLIPTextConfig, root / "text_encoder", device, dtype)
        self.unet_model = _load(UNet2DConditionModel, UNetConfig, root / "unet", device, dtype)
        self.vae = _load(AutoencoderKL, VAEConfig, root / "vae", device, dtype)
        if channels_last:
            self.unet_model.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with ops.kernels(self.kernels):
            return self.text_encoder(input_ids.to(self.device))[0]

    @torch.inference_mode()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with ops.kernels(self.kernels):
            sample = sample.to(self.dtype, memory_format=self.memory_format)
            return self.unet_model(sample, timestep, context.to(self.dtype))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with ops.kernels(self.kernels):
            return self.vae.decode(latents.to(self.dtype, memory_format=self.memory_format))

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with ops.kernels(self.kernels):
            mean, logvar = self.vae.encode(image.to(self.device, self.dtype, memory_format=self.memory_format))
        return mean.float(), logvar.float()

    @torch.inference_mode()
    def decode_fp32(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode in float32 (the fp16 overflow fallback); the fp32 VAE copy is made on first use."""
        if self._vae_fp32 is None:
            self._vae_fp32 = copy.deepcopy(self.vae).float()
        with ops.kernels(self.kernels):
            return self._vae_fp32.decode(latents.to(torch.float32, memory_format=self.memory_format))

    def network(self, name: str) -> torch.nn.Module:
        """The module of network `name`: "text_encoder", "unet" or "vae"."""
        return {"text_encoder": self.text_encoder, "unet": self.unet_model, "vae": self.vae}[name]

    def merge(self, layers, weights) -> None:
        """`fastdiff.lora.merge` into the UNet and text encoder in place (CUDA graphs read the
        weights by address). The base of every weight ever adapted is kept as a copy on first touch
        (memory: those weights once more, e.g. SD1.5's attention projections), so removing every
        adapter restores it bit for bit."""
        lora.merge({"unet": self.unet_model, "text_encoder": self.text_encoder}, layers, weights, self.base_weights)

    def nonfinite_weight(self, network: str) -> str | None:
        """The first parameter of `network` ("text_encoder", "unet", "vae") holding NaN/inf, or None:
        the pipeline's NaN guard names it (a scan of every weight, so only on that error path)."""
        module = self.network(network)
        return next((name for name, p in module.named_parameters() if not torch.isfinite(p).all()), None)


def _load(cls, config_cls, folder: Path, device, dtype):
    config = config_cls.from_json(folder / "config.json")
    return load_module(cls, config, find_weights(folder), device=device, dtype=dtype)
