"""SD1.x networks in plain PyTorch, loadable from diffusers/transformers checkpoints with strict=True."""

from fastdiff.models.clip import CLIPTextConfig, CLIPTextModel
from fastdiff.models.unet import UNet2DConditionModel, UNetConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "UNet2DConditionModel", "UNetConfig", "VAEConfig"]
