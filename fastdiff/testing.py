"""Model folders, machine facts and script loading shared by the benchmarks and the tests.

Not used by the runtime. The benchmarks need a diffusers-format folder that both diffusers and fastdiff load. Without
downloads there are two kinds: the embedded trained model (fastdiff/assets/tiny-shapes) and
random-weight models built here with diffusers/transformers (benchmarks may import them, the
runtime may not) and saved with `save_pretrained`, so fastdiff reads exactly the files a real
download holds. Random weights time the architecture, not the picture quality.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from types import ModuleType

import torch

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_SHAPES = ASSETS / "tiny-shapes"
TOKENIZER_DIR = ASSETS / "clip-tokenizer"

# The embedded model's architecture (training/train_tiny_shapes.py, 64x64 pixels, 16x16 latents):
# the default when the trained weights are not in the checkout yet.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=64,
    norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)
TINY_TEXT = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


# Two small architectures for the tests ("a", "b"), differing in every dimension the model code reads.
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
    norm_eps=1e-6,
    use_linear_projection=True,
    flip_sin_to_cos=False,
    freq_shift=1,
)
TEXT_A = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
              hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
TEXT_B = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
              hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6, hidden_act="gelu")
SMALL_VAE = dict(
    block_out_channels=(32, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)
ARCHS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "a": (UNET_A, SMALL_VAE, TEXT_A), "b": (UNET_B, SMALL_VAE, TEXT_B)}


def architecture(arch: str) -> tuple[dict, dict, dict, dict]:
    """(unet, vae, text encoder, scheduler) constructor arguments for `arch` (one of ARCHS, or
    "sd15"); SD1.5's come from fastdiff.sd15, the one place that holds them."""
    from fastdiff import sd15

    def args(cfg: dict) -> dict:  # config.json bookkeeping keys are not constructor arguments
        return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}

    scheduler = dict(sd15.SD15_SCHEDULER)  # written verbatim: DDIM reads clip_sample, PNDM does not
    if arch in ARCHS:
        return (*ARCHS[arch], scheduler)
    if arch == "sd15":
        c = sd15.SD15_CONFIGS
        return args(c["unet"]), args(c["vae"]), args(c["text_encoder"]), scheduler
    raise ValueError(f"arch={arch!r}: one of {', '.join(ARCHS)} or sd15")


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Add seeded noise to every parameter: default inits zero some layers (conv_out, proj_out),
    which would make outputs constant and parity meaningless."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def build_random_folder(folder: Path, arch: str = "tiny", seed: int = 0, sd15_layout: bool = True,
                        inpainting: bool = False) -> Path:
    """A seeded random-weight StableDiffusionPipeline of architecture `arch`, saved to `folder`
    in diffusers format (fp32 safetensors, the CLIP tokenizer). The embedded model's architecture
    is the default; SD1.5's gives shape-true timings. `sd15_layout`: files as SD1.5's download
    holds them (`text_model.` keys, its scheduler config verbatim); else as save_pretrained writes
    them (transformers 5's unprefixed keys, PNDMScheduler's own config), the other layout fastdiff
    must load. `inpainting`: a 9-channel UNet (latents, mask, masked-image latents), as
    stable-diffusion-inpainting's."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet_cfg, vae_cfg, text_cfg, sched_cfg = architecture(arch)
    if inpainting:
        unet_cfg = dict(unet_cfg, in_channels=2 * vae_cfg["latent_channels"] + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for i, m in enumerate((unet, vae, text)):
        perturb_(m, seed * 10 + i)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=unet.eval(),
        scheduler=PNDMScheduler.from_config(sched_cfg),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    if sd15_layout:
        (Path(folder) / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
        _sd15_text_keys(Path(folder) / "text_encoder" / "model.safetensors")
    return Path(folder)


def _sd15_text_keys(path: Path) -> None:
    """Rewrite the text encoder's keys as SD1.5's file holds them (`text_model.` prefix):
    transformers 5 saves them without it, and a real download is what we time."""
    import safetensors.torch

    state = safetensors.torch.load_file(path)
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    safetensors.torch.save_file(state, path, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_medians(ways: dict, repeats: int) -> dict:
    """Median milliseconds of each of `ways` (name -> callable), timed interleaved (one call of each
    per round, `repeats` rounds) so that a noisy machine's slow spells fall on all of them alike."""
    from fastdiff import ops

    times = ops.time_calls(ways, rounds=repeats, warm=False)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def sd15_on_meta() -> tuple:
    """SD1.5's UNet and VAE built on the meta device: every op's shapes, no weights, no compute
    (what the per-shape CPU benchmarks record their shapes from, with hooks or function modes)."""
    from fastdiff import sd15
    from fastdiff.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig

    with torch.device("meta"):
        return UNet2DConditionModel(UNetConfig.from_dict(sd15.SD15_UNET)).eval(), AutoencoderKL(VAEConfig.from_dict(sd15.SD15_VAE)).eval()


def run_on_meta(size: int, unet=None, vae=None, batch: int = 2) -> None:
    """One UNet forward (`batch` latents: 2 is one image with CFG) and one VAE decode (one image)
    of `sd15_on_meta`'s networks at `size` px, on torch's ops; None skips a network."""
    from fastdiff import ops

    latent = size // 8
    with torch.no_grad(), ops.kernels("torch"), torch.device("meta"):
        if unet is not None:
            unet(torch.randn(batch, 4, latent, latent), torch.tensor([500.0] * batch), torch.randn(batch, 77, 768))
        if vae is not None:
            vae.decode(torch.randn(1, 4, latent, latent))


def conv_shapes(size: int, network: str = "unet", batch: int = 2) -> collections.Counter:
    """(input shape, out channels, kernel, stride, padding) -> calls in one forward of SD1.5's
    `network` ("unet", `batch` latents; "vae", one image's decode) at `size` px, recorded by
    hooks on `sd15_on_meta`'s convolutions."""
    from fastdiff.models.common import Conv2d

    unet, vae = sd15_on_meta()
    model = {"unet": unet, "vae": vae}[network]
    shapes: collections.Counter = collections.Counter()

    def record(mod, args, _out):
        shapes[(tuple(args[0].shape), mod.out_channels, mod.kernel_size[0], tuple(mod.stride), tuple(mod.padding))] += 1

    for mod in model.modules():
        if isinstance(mod, Conv2d):
            mod.register_forward_hook(record)
    run_on_meta(size, **{network: model}, batch=batch)
    return shapes


def relative_rms(got: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of `got - ref` over the RMS of `ref`, in float64: the error measure of the per-shape
    and per-network benchmarks and of the kernels' tests against float64 references."""
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm())


def load_avg() -> float | None:
    """The 1-minute load average: above the core count, other processes share the cores and
    multi-threaded CPU timings swing widely (OpenMP threads wait on descheduled peers)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def environment(device: torch.device) -> dict:
    """Versions and hardware, for the JSON results: a number is useless without them."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("fastdiff", "diffusers", "transformers", "numpy", "onnxruntime", "onnx", "tensorrt", "triton"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except Exception:  # noqa: BLE001 - absent or broken optional package: just not listed
                continue
        versions[name] = getattr(mod, "__version__", "?")
    env = {
        "versions": versions,
        "platform": platform.platform(),
        "device": str(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_avg_1min": load_avg(),
    }
    return env


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def load_script(path: Path) -> ModuleType:
    """Import a script of benchmarks/ or training/ by its path, as `<folder>_<stem>`.

    Putting the script's folder on sys.path instead would make every file there importable
    under its bare name for the rest of the process, shadowing any installed package of that
    name (Hugging Face's `kernels` was shadowed so). The module is registered in sys.modules,
    which dataclasses and pickle look up."""
    path = Path(path).resolve()
    name = f"{path.parent.name}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
