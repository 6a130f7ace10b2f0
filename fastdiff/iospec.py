"""The I/O spec of each exported network: names, dtypes and axes, in one place.

Export, the onnxruntime / TensorRT backends and the benchmarks all read it. Names follow Hugging
Face Optimum's Stable Diffusion ONNX layout (`text_encoder/`, `unet/`, `vae_decoder/`,
`vae_encoder/`), so an export also opens with Optimum's ORTStableDiffusionPipeline and diffusers'
OnnxStableDiffusionPipeline: both feed int32 `input_ids` and a float32 `timestep` of shape [1] (they
read the timestep dtype from the session; float keeps the fractional timesteps of the Euler /
Karras schedules exact).

The VAE encoder outputs the latent Gaussian's moments, `latent_parameters` [B, 2 * latent, h, w]
(mean, then logvar clamped to [-30, 20]), as Optimum's VaeEncoderOnnxConfig does; Optimum's
pipelines rebuild diffusers' DiagonalGaussianDistribution from them (its clamp is the same). Not
diffusers' older `latent_sample`, a latent sampled inside the graph (what its
OnnxStableDiffusionImg2ImgPipeline reads, so that pipeline cannot use this encoder): img2img must
draw the sample from the caller's generator, exactly as `latent_dist.sample(generator)` does.

A shape is a tuple of axis symbols. `dims()` gives every symbol its size for a model (from its
config dicts) and a batch / image size; `DYNAMIC` lists the symbols left free in a dynamic export.
This file also holds SD1.5's config dicts (for `--random-weights` timing exports).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}

# Axis symbols that are dynamic in a dynamic export (everything else is fixed by the model config).
DYNAMIC = ("batch", "latent_height", "latent_width", "height", "width")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. dtype "float" is the export precision (float32 or float16)."""

    name: str
    dtype: str  # "int32" | "float32" | "float"
    shape: tuple[str, ...]  # axis symbols, sized by `dims()`

    def torch_dtype(self, precision: str) -> torch.dtype:
        return PRECISIONS[precision] if self.dtype == "float" else getattr(torch, self.dtype)


@dataclass(frozen=True)
class NetworkSpec:
    """One exported network: its folder in the export, the diffusers folder it comes from, its I/O."""

    name: str  # subfolder in the export: text_encoder / unet / vae_decoder / vae_encoder
    source: str  # subfolder of the diffusers model it is exported from
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    per_image: bool = False  # one row per image (the VAE); the text encoder and UNet see CFG's 2x rows

    @property
    def tensors(self) -> tuple[TensorSpec, ...]:
        return self.inputs + self.outputs

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis index: symbol}} for the axes left free in a dynamic export."""
        return {t.name: {i: s for i, s in enumerate(t.shape) if s in DYNAMIC} for t in self.tensors}

    def shapes(self, d: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Concrete shape of every input and output for the sizes `d` (from `dims`)."""
        return {t.name: tuple(d[s] for s in t.shape) for t in self.tensors}


TEXT_ENCODER = NetworkSpec(
    name="text_encoder",
    source="text_encoder",
    inputs=(TensorSpec("input_ids", "int32", ("batch", "sequence")),),
    outputs=(
        TensorSpec("last_hidden_state", "float", ("batch", "sequence", "text_hidden")),
        TensorSpec("pooler_output", "float", ("batch", "text_hidden")),
    ),
)
UNET = NetworkSpec(
    name="unet",
    source="unet",
    inputs=(
        TensorSpec("sample", "float", ("batch", "unet_in_channels", "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("one",)),
        TensorSpec("encoder_hidden_states", "float", ("batch", "sequence", "context_dim")),
    ),
    outputs=(TensorSpec("out_sample", "float", ("batch", "unet_out_channels", "latent_height", "latent_width")),),
)
VAE_DECODER = NetworkSpec(
    name="vae_decoder",
    source="vae",
    inputs=(TensorSpec("latent_sample", "float", ("batch", "latent_channels", "latent_height", "latent_width")),),
    outputs=(TensorSpec("sample", "float", ("batch", "image_channels", "height", "width")),),
    per_image=True,
)
VAE_ENCODER = NetworkSpec(
    name="vae_encoder",
    source="vae",
    inputs=(TensorSpec("sample", "float", ("batch", "image_in_channels", "height", "width")),),
    outputs=(TensorSpec("latent_parameters", "float", ("batch", "latent_moments", "latent_height", "latent_width")),),
    per_image=True,  # img2img encodes each init image once per call
)
# Export order; the VAE encoder last, so the first three keep the order they always had.
NETWORKS: dict[str, NetworkSpec] = {n.name: n for n in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}


def latent_gaussian(latent_parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE_ENCODER's output [B, 2C, h, w] -> (mean, logvar), float32 [B, C, h, w] each: what
    `Backend.encode_image` returns, whichever runtime ran the encoder."""
    mean, logvar = latent_parameters.float().chunk(2, dim=1)
    return mean, logvar


def vae_scale_factor(vae_config: dict) -> int:
    """Pixels per latent cell: 2 ** (number of VAE resolution levels - 1), 8 for SD."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def dims(configs: dict[str, dict], batch: int, height: int, width: int) -> dict[str, int]:
    """Size of every axis symbol for a model (`configs`: {"text_encoder", "unet", "vae"} config
    dicts as in its config.json files), `batch` rows and a `height` x `width` pixel image."""
    text, unet, vae = configs["text_encoder"], configs["unet"], configs["vae"]
    f = vae_scale_factor(vae)
    if height % f or width % f:
        raise ValueError(f"height={height}, width={width}: must be multiples of {f} (the VAE's scale factor)")
    cross = unet.get("cross_attention_dim", 768)
    return {
        "batch": batch,
        "one": 1,
        "sequence": text.get("max_position_embeddings", 77),
        "text_hidden": text["hidden_size"],
        "unet_in_channels": unet.get("in_channels", 4),
        "unet_out_channels": unet.get("out_channels", 4),
        "context_dim": cross if isinstance(cross, int) else cross[0],
        "latent_channels": vae.get("latent_channels", 4),
        "latent_moments": 2 * vae.get("latent_channels", 4),  # mean and logvar, stacked on the channel axis
        "image_channels": vae.get("out_channels", 3),
        "image_in_channels": vae.get("in_channels", 3),
        "latent_height": height // f,
        "latent_width": width // f,
        "height": height,
        "width": width,
    }


def sample_inputs(
    net: NetworkSpec,
    configs: dict[str, dict],
    *,
    batch: int,
    height: int,
    width: int,
    precision: str = "fp32",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Random inputs of the right names, shapes and dtypes (CPU tensors), for export and checks."""
    d = dims(configs, batch, height, width)
    out = {}
    for t in net.inputs:
        shape, dtype = tuple(d[s] for s in t.shape), t.torch_dtype(precision)
        if t.name == "input_ids":
            vocab = configs["text_encoder"].get("vocab_size", 49408)
            out[t.name] = torch.randint(0, vocab, shape, generator=generator).to(dtype)
        elif t.name == "timestep":
            out[t.name] = (torch.rand(shape, generator=generator) * 999).to(dtype)
        else:
            out[t.name] = torch.randn(shape, generator=generator).to(dtype)
    return out


def call_inputs(net: NetworkSpec, configs: dict[str, dict], *, height: int, width: int, generator: torch.Generator | None = None) -> tuple:
    """`sample_inputs` for one call of `net` as a pipeline of one image makes it (CFG's two rows
    for the text encoder and UNet, one for the VAE), in the network's positional order."""
    x = sample_inputs(net, configs, batch=1 if net.per_image else 2, height=height, width=width, generator=generator)
    return tuple(x[t.name] for t in net.inputs)
