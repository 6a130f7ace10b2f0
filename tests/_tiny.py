"""Small random-weight SD pipelines saved in diffusers format, for tests that need a model folder.

They are built with diffusers/transformers (the references) and saved with `save_pretrained`, so
fastdiff's loading code reads exactly the files a real SD1.5 download holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastdiff.sd15 import SD15_SCHEDULER

ASSETS = Path(__file__).resolve().parents[1] / "fastdiff" / "assets"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"


# Two UNet configs that differ in every dimension the model code reads.
UNET_A = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)
UNET_B = dict(
    block_out_channels=(16, 32, 48),
    layers_per_block=1,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=(2, 4, 4),
    norm_num_groups=8,
    use_linear_projection=True,
)
TEXT_A = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
TEXT_B = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6, hidden_act="gelu")
VAE = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
CONFIGS = {"a": (UNET_A, TEXT_A), "b": (UNET_B, TEXT_B)}


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add noise to every parameter: default inits zero some layers and would hide bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def make_sd_folder(folder: Path, which: str = "a", seed: int = 0) -> Path:
    """Build a random-weight StableDiffusionPipeline and save it, diffusers-format, in `folder`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, text_cfg = CONFIGS[which]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**VAE)
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **text_cfg)
    )
    for i, m in enumerate((unet, vae, text)):
        perturb_(m, seed * 10 + i)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),  # ignores clip_sample
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
