"""Fit the VAE encoder's posterior variance of the embedded "tiny-shapes" model (stage 6).

train_tiny_shapes.py trains the VAE decoding the posterior *mean* only, so the log-variance
head got nothing but the tiny KL's gradient and sits near logvar 0 (std ~1 against latent means
of std ~2.8). img2img and inpainting encode with `latent_dist.sample(generator)`, as diffusers
does, so their latents carry that noise (coloured speckle in an inpainted image's kept region).

This phase trains only the logvar rows of `quant_conv` (the 1x1 conv whose output
DiagonalGaussianDistribution splits into mean, first C channels, and logvar, last C) on the
VAE's ELBO with the recipe's KL weight: reconstruct decode(mean + std * eps) (MSE + 0.1 L1, as
train_vae) + kl_weight * KL. Encoder body, mean rows and decoder are frozen, so the latent means,
the UNet trained on them and every text-to-image output are unchanged. Saves the VAE weights
back in fp16, in place, and checks that every other tensor of the file is bit-identical.

    python training/fit_encoder_variance.py                 # 300 steps x 16, ~1 min on 2 cores
    python training/fit_encoder_variance.py --steps 50 --out /tmp/copy-of-tiny-shapes
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import shapes_data as shapes  # the sibling scripts: this folder is sys.path[0]
from train_tiny_shapes import OUT, TrainConfig, lr_at, vae_loss

WEIGHTS = "diffusion_pytorch_model.safetensors"
BATCH = 16
# Adam steps ~LR x (mean / rms) of the gradient, and the reparameterised logvar gradient has a
# signal ~var under noise ~std: steps shrink with std, so only a large LR (36 weights) moves
# logvar from ~0 most of the way to the ELBO optimum (~-12 at this KL weight) in a few hundred
# steps (5e-2: logvar -2.8, decode(sample) error 5.2/255; 1.0: -7.2, 4.55/255; held-out batch).
LR = 1.0
HELDOUT = 64  # images of held-out (shape, colour, background) triples for the before/after figures


class LogvarHead(torch.nn.Module):
    """The encoder's posterior with only quant_conv's logvar rows trainable: the encoder body and
    the mean rows run without gradient, so the means cannot move (a separate copy of the logvar
    rows, written back by `write_back`, instead of masking gradients of a shared tensor)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.c = vae.config.latent_channels
        qc = vae.quant_conv
        self.weight = torch.nn.Parameter(qc.weight[self.c:].detach().clone())  # [C, 2C, 1, 1]
        self.bias = torch.nn.Parameter(qc.bias[self.c:].detach().clone())  # [C]

    def forward(self, x: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        qc = self.vae.quant_conv
        with torch.no_grad():
            h = self.vae.encoder(x)  # [B, 2C, h, w]
            mean = F.conv2d(h, qc.weight[: self.c], qc.bias[: self.c])  # [B, C, h, w]
        logvar = F.conv2d(h, self.weight, self.bias)  # [B, C, h, w]
        return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))  # [B, 2C, h, w]

    @torch.no_grad()
    def write_back(self) -> None:
        self.vae.quant_conv.weight[self.c:] = self.weight
        self.vae.quant_conv.bias[self.c:] = self.bias


def to_pixels(images_u8) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # [N, 3, 64, 64]


@torch.no_grad()
def measure(vae, x: torch.Tensor, seed: int) -> dict[str, float]:
    """Posterior std (mean over latent pixels) and the mean abs error, in 1/255 units, of
    decode(mean) and of decode(sample) (a fixed eps, so before and after compare)."""
    post = vae.encode(x).latent_dist
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(seed))

    def err(z: torch.Tensor) -> float:
        return (vae.decode(z).sample.clamp(-1, 1) - x).abs().mean().item() * 127.5

    return {"std": post.std.mean().item(), "logvar": post.logvar.mean().item(),
            "mean_std": post.mean.std().item(), "err_mean": err(post.mean),
            "err_sample": err(post.mean + post.std * eps)}


def fit(vae, images: torch.Tensor, steps: int, cfg: TrainConfig, gen: torch.Generator) -> None:
    """The ELBO with train_vae's reconstruction terms and KL normalisation, logvar rows only."""
    for p in vae.parameters():
        p.requires_grad_(False)
    head = LogvarHead(vae)
    opt = torch.optim.AdamW(head.parameters(), lr=LR, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = LR * lr_at(step, cfg.warmup, step / steps)
        x = images[torch.randint(len(images), (BATCH,), generator=gen)]  # [B, 3, 64, 64]
        post = head(x)
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)  # [B, C, h, w]
        loss, rec, kl = vae_loss(vae.decode(z).sample, x, post, cfg.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"encvar {step:4d} rec {rec.item():.5f} kl {kl.item():.3f} std {post.std.mean().item():.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
    head.write_back()
    with torch.no_grad():  # the head computes what vae.encode now computes
        ref, got = vae.encode(images[:8]).latent_dist, head(images[:8])
        assert torch.allclose(ref.logvar, got.logvar, atol=1e-5) and torch.equal(ref.mean, got.mean)


def save_weights(vae, folder: Path, original: dict[str, torch.Tensor]) -> None:
    """fp16 via save_pretrained (as train_tiny_shapes.save) into a temporary folder, checked
    against the `original` tensors, then an atomic replace of the weights file only (config.json
    must come out unchanged): a failed check leaves the shipped file as it was."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as tmp:
        vae.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        vae.to(torch.float32)
        new, old = (json.loads(p.read_text()) for p in (Path(tmp) / "config.json", folder / "config.json"))
        if {**new, "_name_or_path": None} != {**old, "_name_or_path": None}:  # the load path, not saved
            raise RuntimeError(f"save_pretrained wrote a different config.json than {folder}'s; not saving")
        new_file = Path(tmp) / WEIGHTS  # same file system as the target: the replace is a rename
        compare_files(original, new_file, vae.config.latent_channels)
        new_file.chmod((folder / WEIGHTS).stat().st_mode & 0o777)
        new_file.replace(folder / WEIGHTS)


def compare_files(before: dict[str, torch.Tensor], path: Path, c: int) -> int:
    """Every tensor bit-identical to the original file's except quant_conv's logvar rows;
    returns how many logvar-row values changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    after = load_file(path)
    assert after.keys() == before.keys(), "tensor names differ"
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}, f.metadata()  # as save_pretrained writes it
    def bits(t: torch.Tensor) -> torch.Tensor:  # the raw bytes: -0.0 != 0.0, NaN == NaN
        return t.contiguous().view(torch.uint8)

    changed = 0
    for name, a in before.items():
        b = after[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name.startswith("quant_conv."):
            assert torch.equal(bits(a[:c]), bits(b[:c])), f"{name}: mean rows changed"
            changed += int((a[c:] != b[c:]).sum())
        else:
            assert torch.equal(bits(a), bits(b)), f"{name} changed"
    print(f"{len(before)} tensors: all bit-identical but quant_conv's logvar rows "
          f"({changed} fp16 values changed)", flush=True)
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="model folder whose vae/ is updated in place")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    cfg = TrainConfig()
    folder = args.out / "vae"
    original = load_file(folder / WEIGHTS)  # fp16, kept for the bit-for-bit comparison
    vae = AutoencoderKL.from_pretrained(folder).float().eval()
    c = vae.config.latent_channels
    mean_rows = vae.quant_conv.weight[:c].clone(), vae.quant_conv.bias[:c].clone()

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = to_pixels(shapes.make_dataset(cfg.n_images, seed=cfg.seed)[0])  # the training split
    heldout = to_pixels(shapes.make_dataset(HELDOUT, seed=cfg.seed + 1, triples=shapes.heldout_triples())[0])
    before = measure(vae, heldout, cfg.seed)
    print("before", {k: round(v, 4) for k, v in before.items()}, flush=True)

    t0 = time.time()
    fit(vae, images, args.steps, cfg, gen)
    seconds = time.time() - t0
    assert torch.equal(vae.quant_conv.weight[:c], mean_rows[0]) and torch.equal(vae.quant_conv.bias[:c], mean_rows[1])
    print(f"fitted {args.steps} steps x {BATCH} in {seconds:.0f}s; quant_conv mean rows bit-identical", flush=True)

    save_weights(vae, folder, original)
    saved = AutoencoderKL.from_pretrained(folder).float().eval()  # the fp16 weights as shipped
    after = measure(saved, heldout, cfg.seed)
    print("after ", {k: round(v, 4) for k, v in after.items()}, flush=True)
    print(f"held-out {HELDOUT}: posterior std {before['std']:.4f} -> {after['std']:.4f}, decode(sample) error "
          f"{before['err_sample']:.2f} -> {after['err_sample']:.2f} /255, decode(mean) "
          f"{before['err_mean']:.2f} -> {after['err_mean']:.2f} /255; saved to {folder / WEIGHTS}", flush=True)


if __name__ == "__main__":
    main()
