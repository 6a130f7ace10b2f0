"""Train the embedded "tiny-shapes" model on the CPU and save it as an SD1.5-layout folder.

A scaled-down Stable Diffusion 1.5: an AutoencoderKL (4 latent channels, downsampling 4), a CLIP
text encoder on the real CLIP vocabulary (so any prompt tokenizes) and a UNet2DConditionModel
with the SD block types (cross-attention down/up blocks, plain resnet blocks, GEGLU
feed-forward), trained on the procedural shapes of training/shapes_data.py. The folder loads with
diffusers' StableDiffusionPipeline.from_pretrained and with fastdiff's own loader.

    python training/train_tiny_shapes.py                 # stage 1: train + save (~35 min on 2 cores)
    python training/train_tiny_shapes.py --resume X.ckpt.pt ...  # later stages (training/README.md)
    python training/train_tiny_shapes.py --quick         # a few-minute smoke version
    python training/train_tiny_shapes.py --eval-only     # measure prompt adherence of the saved model

Phases: (1) the VAE on pixels (MSE + L1 + a tiny KL), optionally (--decoder-steps) its decoder
alone on the frozen encoder's latents; (2) the scaling factor = 1 / std of the
latents, as SD did; (3) text encoder + UNet jointly on epsilon prediction with min-SNR
weighting (x0 weight floored at high noise), half of each batch from one timestep band, a 3x
learning rate for the text encoder and cross-attention (the `probe` lines show whether the
prompt moves the prediction), 10% empty captions (for classifier-free guidance), AdamW with warm-up and cosine
decay, EMA weights (the EMA is what gets saved).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Passive OpenMP waits: on a shared, busy machine spinning worker threads slow training ~5x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

import shapes_data as shapes  # the sibling script: this folder is sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fastdiff" / "assets" / "tiny-shapes"
TOKENIZER = ROOT / "fastdiff" / "assets" / "clip-tokenizer"

# SD1.5's scheduler_config.json, verbatim.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    n_images: int = 6000
    vae_steps: int = 500
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    steps: int = 100_000  # upper bound; `minutes` usually ends training first
    minutes: float = 22.0  # wall-clock budget of the UNet phase (the LR schedule follows it)
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    # Conditioning: colour is decided at high noise, outlines at middle noise (t ~ 100-700), and the
    # text path starts from nothing, so draw a share of each batch from the band that matters and
    # give the text encoder + cross-attention a larger learning rate (the uniform-t, single-LR run
    # learnt an unconditional model).
    high_t_frac: float = 0.5  # share of each batch drawn from t in [high_t_min, high_t_max)
    high_t_min: int = 500
    high_t_max: int = 1000
    cond_lr_mult: float = 3.0  # LR multiplier of the text encoder and the attn2 (cross-attention) layers
    # Eps-loss at high noise barely depends on the clean image (d eps = sqrt(snr) d x0, snr ~ 0.01),
    # so the text's gain there is invisible to min-SNR weighting: floor the implied x0-loss weight.
    x0_weight_floor: float = 0.1
    probe_every: int = 100
    # Decoder-only fine-tune on the frozen encoder's latents (the latent space, and so a UNet
    # trained on it, stays valid): sharpens outlines the 500-step VAE phase leaves blurred.
    decoder_steps: int = 0
    decoder_batch: int = 16
    decoder_lr: float = 1e-3
    # sizes
    # Norm groups of >= 4 channels: with 1 channel per group (e.g. 32 groups of 32 channels) the
    # final GroupNorm removes each channel's spatial mean, so a flat colour cannot be represented.
    vae_channels: tuple[int, ...] = (16, 32, 64)  # 16 at full resolution: 2x cheaper than 32
    vae_groups: int = 4
    unet_groups: int = 8
    unet_channels: tuple[int, ...] = (32, 64, 128)
    text_hidden: int = 64
    text_layers: int = 3


QUICK = TrainConfig(n_images=256, vae_steps=5, minutes=0.2, warmup=5, ema_decay=0.98)
# The lessons of the staged recipe (training/README.md) in one from-scratch run of about an hour:
# a decoder fine-tune, and the middle-noise band from the start (outlines), with a mild x0 floor
# (colour).
ONE_RUN = TrainConfig(decoder_steps=600, minutes=47.0, high_t_min=100, high_t_max=700, x0_weight_floor=0.1)
# TrainConfig fields a command-line option of the same name overrides when given.
CLI_OVERRIDES = ("steps", "minutes", "high_t_min", "high_t_max", "decoder_steps", "x0_weight_floor")


def build_models(cfg: TrainConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels, layers_per_block=1, norm_num_groups=cfg.vae_groups,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=cfg.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    factor = 2 ** (n - 1)
    unet = UNet2DConditionModel(
        sample_size=shapes.SIZE // factor, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=cfg.unet_channels, layers_per_block=1, attention_head_dim=4,
        cross_attention_dim=cfg.text_hidden, norm_num_groups=cfg.unet_groups,
    )
    return vae, text, unet


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def lr_at(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps then cosine decay to 10% as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def vae_loss(y: torch.Tensor, x: torch.Tensor, post, kl_weight: float):
    """(loss, reconstruction, KL per pixel): MSE + 0.1 L1 of the decoded `y` against `x`, plus the
    weighted KL of the posterior `post` (flat colours need no GAN/LPIPS)."""
    rec = F.mse_loss(y, x) + 0.1 * (y - x).abs().mean()
    kl = post.kl().mean() / x[0].numel()
    return rec + kl_weight * kl, rec, kl


def train_vae(vae, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Pixels in [-1, 1] -> reconstruct; MSE + L1 + tiny KL (flat colours need no GAN/LPIPS)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_at(step, cfg.warmup, step / cfg.vae_steps)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = images[idx]  # whole images: crops shifted GroupNorm statistics (washed-out colours)
        post = vae.encode(x).latent_dist
        y = vae.decode(post.mean).sample  # the mean: sampling at init std 1 drowns the signal
        loss, rec, kl = vae_loss(y, x, post, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == cfg.vae_steps - 1:
            print(f"vae {step:5d} rec {rec.item():.5f} kl {kl.item():.2f} {time.time() - t0:.0f}s", flush=True)
    return vae


def train_decoder(vae, means: torch.Tensor, images: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Fine-tune the decoder alone on fixed latent means (MSE + 0.5 L1: L1 favours sharp edges)."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    t0 = time.time()
    for step in range(cfg.decoder_steps):
        for g in opt.param_groups:
            g["lr"] = cfg.decoder_lr * lr_at(step, cfg.warmup, step / cfg.decoder_steps)
        idx = torch.randint(len(images), (cfg.decoder_batch,), generator=gen)
        y = vae.decode(means[idx]).sample
        rec = F.mse_loss(y, images[idx]) + 0.5 * (y - images[idx]).abs().mean()
        opt.zero_grad(set_to_none=True)
        rec.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.decoder_steps - 1:
            print(f"decoder {step:5d} rec {rec.item():.5f} {time.time() - t0:.0f}s", flush=True)
    vae.eval()


class Captions:
    """Random caption variants of the training scenes, tokenized through a cache (the set of
    distinct captions is small) to 77 tokens as SD does."""

    def __init__(self, tokenizer, scenes, rng: np.random.Generator, dropout: float):
        self.tok, self.scenes, self.rng, self.dropout = tokenizer, scenes, rng, dropout
        self.cache: dict[str, torch.Tensor] = {}

    def ids(self, text: str) -> torch.Tensor:
        if text not in self.cache:
            self.cache[text] = self.tok(text, padding="max_length", max_length=77, truncation=True,
                                        return_tensors="pt").input_ids[0]
        return self.cache[text]

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        texts = ["" if self.rng.random() < self.dropout else shapes.caption(self.scenes[i], self.rng)
                 for i in idx.tolist()]
        return torch.stack([self.ids(t) for t in texts])  # [B, 77]


@torch.no_grad()
def probe_conditioning(text, unet, tokenizer) -> str:
    """How much the prompt moves the predicted noise: the relative eps change between prompts
    differing only in colour (at t = 800, where colour is decided) and only in shape, circle vs
    square (at t = 400, where the outline is decided). The loss hides this (it is dominated by the
    easy unconditional part); an unconditional model scores ~0.001."""
    prompts = ["a red circle on a blue background", "a green circle on a blue background",
               "a red square on a blue background"]
    ids = tokenizer([prompts[i] for i in (0, 1, 0, 2)], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids  # [4, 77]
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)).expand(4, -1, -1, -1)
    t = torch.tensor([800, 800, 400, 400])
    was_training = text.training
    text.eval(), unet.eval()
    eps = unet(z, t, text(ids).last_hidden_state).sample  # [4, 4, 16, 16]
    text.train(was_training), unet.train(was_training)
    colour = (eps[0] - eps[1]).norm() / eps[0].norm()
    shape = (eps[2] - eps[3]).norm() / eps[2].norm()
    return f"colour {colour.item():.4f} shape {shape.item():.4f}"


def train_diffusion(text, unet, latents, captions: Captions, cfg: TrainConfig, gen: torch.Generator):
    """Epsilon prediction with min-SNR-gamma weighting; returns the EMA copies."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, 0).float()  # [1000]
    snr = abar / (1 - abar)
    weight = snr.clamp(max=cfg.min_snr_gamma).clamp(min=cfg.x0_weight_floor) / snr  # min-SNR, eps targets

    ema_text, ema_unet = copy.deepcopy(text).eval(), copy.deepcopy(unet).eval()
    cond = list(text.parameters()) + [p for n, p in unet.named_parameters() if "attn2" in n]
    rest = [p for n, p in unet.named_parameters() if "attn2" not in n]
    params = cond + rest
    opt = torch.optim.AdamW([{"params": cond, "mult": cfg.cond_lr_mult}, {"params": rest, "mult": 1.0}],
                            lr=cfg.lr, weight_decay=0.01)
    t0, avg = time.time(), None
    for step in range(cfg.steps):
        progress = max(step / cfg.steps, (time.time() - t0) / (60 * cfg.minutes))
        if progress >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["mult"] * lr_at(step, cfg.warmup, progress)
        idx = torch.randint(len(latents), (cfg.batch,), generator=gen)
        z0 = latents[idx]  # [B, 4, h, w]
        ids = captions.batch(idx)  # [B, 77]
        n_high = int(cfg.batch * cfg.high_t_frac)
        t = torch.cat([torch.randint(cfg.high_t_min, cfg.high_t_max, (n_high,), generator=gen),
                       torch.randint(1000, (cfg.batch - n_high,), generator=gen)])  # [B]
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        hidden = text(ids).last_hidden_state  # [B, 77, hidden]
        pred = unet(zt, t, hidden).sample
        loss = (weight[t] * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_text, text, decay)
        ema_update(ema_unet, unet, decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"unet {step:5d} loss {loss.item():.4f} avg {avg:.4f} {time.time() - t0:.0f}s", flush=True)
        if step % cfg.probe_every == 0:
            print(f"probe {step:5d} eps change live {probe_conditioning(text, unet, captions.tok)} "
                  f"ema {probe_conditioning(ema_text, ema_unet, captions.tok)}", flush=True)
    print(f"unet done: {step} steps, last avg loss {avg:.4f} in {time.time() - t0:.0f}s "
          f"(rerun with --steps {step} --minutes 1e9 to repeat it)", flush=True)
    return ema_text, ema_unet


def save_grid(x: torch.Tensor, path: Path, cols: int = 8) -> None:
    """Images in [-1, 1], [N, 3, H, W] (N a multiple of cols) -> one PNG grid."""
    from PIL import Image

    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # [N, H, W, 3]
    n, h, w, _ = u8.shape
    g = u8.reshape(n // cols, cols, h, w, 3).transpose(0, 2, 1, 3, 4)  # [rows, H, cols, W, 3]
    Image.fromarray(g.reshape(n // cols * h, cols * w, 3)).save(path)


def save(vae, text, unet, tokenizer, out: Path) -> None:
    """fp16 safetensors in SD1.5's folder layout, tokenizer from the CLIP vocab asset."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    sched = PNDMScheduler.from_config(SD15_SCHEDULER)  # ignores clip_sample, which PNDM lacks
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2) + "\n")
    shutil.rmtree(out / "tokenizer")  # the shared asset's files verbatim (no 3.6 MB tokenizer.json)
    shutil.copytree(TOKENIZER, out / "tokenizer")


def evaluate(folder: Path, steps_list=(25, 10), guidance: float = 6.0, seed: int = 0, grid: Path | None = None):
    """Prompt adherence on the held-out prompts: colour / shape match % by the pixel classifier."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes.heldout_prompts()
    results = {}
    for steps in steps_list:
        gen = torch.Generator().manual_seed(seed)
        out = pipe([p for p, _ in prompts], height=shapes.SIZE, width=shapes.SIZE, num_inference_steps=steps,
                   guidance_scale=guidance, generator=gen, output_type="np").images
        imgs = (out * 255).round().astype(np.uint8)  # [N, 64, 64, 3]
        found = [shapes.classify(im) for im in imgs]
        colour = 100 * np.mean([c == s.colour for (c, _), (_, s) in zip(found, prompts)])
        shape = 100 * np.mean([k == s.shape for (_, k), (_, s) in zip(found, prompts)])
        results[steps] = (colour, shape)
        print(f"eval {steps} steps, guidance {guidance}: colour {colour:.1f}% shape {shape:.1f}% "
              f"on {len(prompts)} held-out prompts", flush=True)
        if grid is not None:
            cols = 8
            pad = (-len(imgs)) % cols
            g = np.concatenate([imgs, np.zeros((pad, *imgs.shape[1:]), np.uint8)])
            g = g.reshape(-1, cols, *imgs.shape[1:]).transpose(0, 2, 1, 3, 4)  # [rows, H, cols, W, 3]
            Image.fromarray(g.reshape(g.shape[0] * g.shape[1], -1, 3)).save(grid.with_suffix(f".{steps}.png"))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few-minute smoke run")
    ap.add_argument("--one-run", action="store_true", help="the whole recipe from scratch in one ~1 h run")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--steps", type=int, help="UNet steps (overrides the default bound)")
    ap.add_argument("--minutes", type=float, help="UNet wall-clock budget")
    ap.add_argument("--high-t-min", type=int, help="lower bound of the emphasised share's timesteps")
    ap.add_argument("--high-t-max", type=int, help="upper bound (exclusive) of the emphasised share's timesteps")
    ap.add_argument("--decoder-steps", type=int, help="decoder-only fine-tune steps on the frozen encoder's latents")
    ap.add_argument("--x0-floor", dest="x0_weight_floor", type=float, help="floor of the implied x0-loss weight")
    ap.add_argument("--resume", type=Path, help="a .ckpt.pt of an earlier run: keep its VAE, continue text+UNet")
    ap.add_argument("--grid", type=Path, default=Path("/tmp/tiny_shapes_grid.png"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.eval_only:
        evaluate(args.out, grid=args.grid)
        return

    from transformers import CLIPTokenizer

    cfg = QUICK if args.quick else ONE_RUN if args.one_run else TrainConfig()
    overrides = {k: getattr(args, k) for k in CLI_OVERRIDES if getattr(args, k) is not None}
    cfg = replace(cfg, **overrides)
    print(cfg, flush=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.time()

    images_u8, scenes = shapes.make_dataset(cfg.n_images, seed=cfg.seed)
    images = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, 64, 64]
    vae, text, unet = build_models(cfg)
    print(f"params: vae {n_params(vae):,} text {n_params(text):,} unet {n_params(unet):,}", flush=True)

    if args.resume:
        ck = torch.load(args.resume)
        for m, k in ((vae, "vae"), (text, "text"), (unet, "unet")):
            m.load_state_dict(ck[k])
        print(f"resumed from {args.resume}", flush=True)
    else:
        train_vae(vae, images, cfg, gen)
    vae.eval()
    with torch.no_grad():
        save_grid(torch.cat([images[:32], vae(images[:32]).sample]), args.grid.with_suffix(".vae.png"))
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    if cfg.decoder_steps:
        train_decoder(vae, means, images, cfg, gen)
    scale = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scale)
    latents = means * scale  # [N, 4, 16, 16], unit std like SD's latents
    print(f"latents {tuple(latents.shape)} scaling_factor {scale:.5f} {time.time() - t_start:.0f}s", flush=True)

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    captions = Captions(tokenizer, scenes, np.random.default_rng(cfg.seed), cfg.caption_dropout)
    ema_text, ema_unet = train_diffusion(text, unet, latents, captions, cfg, gen)
    print(f"trained in {time.time() - t_start:.0f}s", flush=True)
    torch.save({"vae": vae.state_dict(), "text": ema_text.state_dict(), "unet": ema_unet.state_dict()},
               args.grid.with_suffix(".ckpt.pt"))  # a fallback copy in fp32, outside the repo

    save(vae, ema_text, ema_unet, tokenizer, args.out)
    print(f"saved to {args.out}", flush=True)
    evaluate(args.out, grid=args.grid)


if __name__ == "__main__":
    main()
