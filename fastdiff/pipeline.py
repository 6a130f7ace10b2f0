"""Text-to-image pipeline: tokenize, encode, denoise with classifier-free guidance, decode.

The loop is shared by every backend (torch, onnxruntime, tensorrt): a backend only runs the three
networks. Latents are kept in float32 for the scheduler math whatever the network dtype, and the
initial noise is drawn exactly as diffusers' StableDiffusionPipeline draws it from
`torch.Generator("cpu").manual_seed(seed)`, so the same seed gives the same picture.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastdiff import ops, schedulers
from fastdiff.backends import BACKENDS, make_backend
from fastdiff.tokenizer import CLIPTokenizer
from fastdiff.weights import resolve_model

log = logging.getLogger("fastdiff")

OUTPUT_TYPES = ("pil", "np")
_MAX_GRAPHS = 4  # captured step graphs kept per pipeline
SCHEDULER_NAMES = tuple(schedulers.SCHEDULERS) + ("dpmpp_2m_karras",)


@dataclass
class Result:
    """What one run produced: images (as requested) and the seconds each stage took."""

    images: object
    timings: dict = field(default_factory=dict)


def check_args(prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type):
    """Every argument error is raised here, before any model work; returns (prompts, negatives)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negative = None
    if negative_prompt is not None:
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if not prompts:
        raise ValueError("prompt: give a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt: every prompt must be a str")
    if negative is not None:
        if not all(isinstance(p, str) for p in negative):
            raise ValueError("negative_prompt: every negative prompt must be a str")
        if len(negative) != len(prompts):
            raise ValueError(
                f"negative_prompt: got {len(negative)} negative prompts for {len(prompts)} prompts; "
                "give one string, or a list of the same length as prompt"
            )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r}: must be an integer >= 1")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale={guidance_scale!r}: must be >= 0 (<= 1 turns guidance off)")
    for name, v in (("height", height), ("width", width)):
        if v is not None and (not isinstance(v, int) or v < 8 or v % 8):
            raise ValueError(f"{name}={v!r}: must be a positive multiple of 8 (e.g. 512)")
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler={scheduler!r}: allowed values are {', '.join(SCHEDULER_NAMES)}")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r}: must be an integer >= 1")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: allowed values are {', '.join(OUTPUT_TYPES)}")
    return prompts, negative


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """A loaded model plus a backend; build once with `from_pretrained`, call `generate` many times.

    `generate` is safe to call from several threads at once: per-call state (latents, scheduler
    buffers, generator) lives in the call, the networks are read-only.
    """

    def __init__(
        self,
        root: Path,
        backend,
        tokenizer: CLIPTokenizer,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cuda_graph: bool = True,
    ):
        self.root, self.backend, self.tokenizer = root, backend, tokenizer
        self.device, self.dtype = device, dtype
        self.cuda_graph = cuda_graph
        self._graphs: dict = {}  # GraphKey -> GraphedStep
        self._calls: dict = {}  # (network, input shape, dtype, kernel mode) -> GraphedCall
        self._graphs_lock = threading.Lock()
        index = json.loads((root / "model_index.json").read_text())
        self.scheduler_config = schedulers.SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json")
        unet_cfg = json.loads((root / "unet" / "config.json").read_text())
        vae_cfg = json.loads((root / "vae" / "config.json").read_text())
        self.vae_scale_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        self.scaling_factor = float(vae_cfg.get("scaling_factor", 0.18215))
        self.latent_channels = int(unet_cfg.get("in_channels", 4))
        self.default_size = int(unet_cfg.get("sample_size", 64)) * self.vae_scale_factor
        self.model_name = index.get("_name_or_path") or root.name

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        kernels: str | None = None,
        cuda_graph: bool = True,
        channels_last: bool | None = None,
    ) -> "Pipeline":
        """Load `model` (a name or a diffusers-format folder) onto `backend`.

        kernels: "torch" | "triton" | "auto" | None (FASTDIFF_KERNELS) for the torch backend's ops.
        cuda_graph: capture each denoising step in one CUDA graph on GPU (False: eager, for debugging).
        channels_last: the torch backend's UNet and VAE in NHWC memory order (same function).
            None: on for CUDA (measured on an H200, SD1.5 512 px fp16 with graph + Triton: UNet step
            7.1 ms vs 11.4 ms NCHW), off on CPU (not measured faster there).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
        root = resolve_model(model)
        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        net = make_backend(backend, root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        log.info("fastdiff: loaded %s on %s (%s, backend %s)", root, device, dtype, net.name)
        return cls(root, net, tokenizer, device=device, dtype=dtype, cuda_graph=cuda_graph)

    # ------------------------------------------------------------------------------------------
    def _graphs_enabled(self) -> bool:
        return self.cuda_graph and self.device.type == "cuda" and getattr(self.backend, "capturable", False)

    def _graphed_step(self, sched, name, karras, steps, cfg, latents, context):
        """The captured step for these settings (captured on first use), or None when not on CUDA."""
        if not self._graphs_enabled():
            return None
        from fastdiff.graphs import GraphedStep, GraphKey

        key = GraphKey(
            tuple(latents.shape), tuple(context.shape), name, karras, steps, cfg, self.dtype, self._kernel_mode()
        )
        return self._captured(
            self._graphs, key, _MAX_GRAPHS, lambda: GraphedStep(key, sched, self.backend.unet, self.device)
        )

    def _kernel_mode(self) -> str:
        """The ops mode the backend's calls run under now: part of every capture's key."""
        return getattr(self.backend, "kernels", None) or ops.get_kernels()

    def _captured(self, cache: dict, key, limit: int, make):
        """cache[key], made by `make()` on first use; the oldest capture is dropped past `limit`."""
        with self._graphs_lock:
            graphed = cache.get(key)
            if graphed is None:
                if len(cache) >= limit:  # bound memory: drop the oldest capture
                    cache.pop(next(iter(cache)))
                graphed = cache[key] = make()
        return graphed

    def _call(self, network: str, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x) through a captured GraphedCall per input shape when graphs are on, else eagerly."""
        if not self._graphs_enabled():
            return fn(x)
        from fastdiff.graphs import GraphedCall

        x = x.to(self.device)
        key = (network, tuple(x.shape), x.dtype, self._kernel_mode())
        graphed = self._captured(self._calls, key, 2 * _MAX_GRAPHS, lambda: GraphedCall(fn, x))
        with graphed.lock:
            return graphed(x)

    def _decode_fp32(self, latents):
        """fp16 VAE overflowed (NaN/inf): decode again in fp32, warning once per pipeline."""
        if not hasattr(self.backend, "decode_fp32"):
            raise RuntimeError(
                f"the fp16 VAE decode gave NaN/inf and the {getattr(self.backend, 'name', 'current')!r} backend "
                "has no fp32 VAE to decode again with; use backend='torch' or dtype=torch.float32 for this model"
            )
        if not getattr(self, "_warned_fp32_decode", False):
            log.warning("fastdiff: fp16 VAE decode overflowed; decoding in fp32 (slower) from now on when needed")
            self._warned_fp32_decode = True
        return self.backend.decode_fp32(latents).float()

    def generate(self, prompt, **kwargs):
        """One PIL.Image for one prompt and one image, else a list; output_type="np" gives
        float32 [N, H, W, 3] in [0, 1]. Arguments as in `run`."""
        result = self.run(prompt, **kwargs)
        return result.images

    def run(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        scheduler: str = "dpmpp_2m",
        num_images: int = 1,
        output_type: str = "pil",
        timed: bool = False,
    ) -> Result:
        """Like `generate`, returning a `Result` with per-stage seconds (synchronised when timed)."""
        single = isinstance(prompt, str)
        prompts, negative = check_args(
            prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type
        )
        height = height or self.default_size
        width = width or self.default_size

        timings: dict[str, float] = {}
        clock = _Clock(self.device, timed, timings)
        cfg = guidance_scale > 1.0  # as diffusers: guidance off at <= 1
        n = len(prompts) * num_images

        # 1. Text: [negative; positive] embeddings, each prompt repeated num_images times.
        with clock("text_encoder"):
            ids = self.tokenizer(prompts)  # [B, 77]
            if cfg:
                ids = torch.cat([self.tokenizer(negative or [""] * len(prompts)), ids])  # [2B, 77]
            context = self._call("text_encoder", self.backend.encode_text, ids)  # [(2)B, 77, D]
            context = context.repeat_interleave(num_images, dim=0)  # [(2)N, 77, D]

        # 2. Initial noise, drawn like diffusers: CPU generator, network dtype, then scaled.
        generator = torch.Generator("cpu")
        generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
        name, karras = (scheduler[: -len("_karras")], True) if scheduler.endswith("_karras") else (scheduler, False)
        sched = schedulers.make_scheduler(
            name, self.scheduler_config, steps, device=self.device, dtype=torch.float32, karras=karras
        )
        shape = (n, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device, torch.float32)
        latents = latents * sched.init_noise_sigma
        n_evals = len(sched.timesteps)
        noise = None
        if getattr(sched, "needs_noise", False):  # ancestral sampling: per-step noise, drawn up front in order
            noise = torch.randn((n_evals, *shape), generator=generator, dtype=self.dtype).to(self.device, torch.float32)

        # 3. Denoise: one captured CUDA graph per step where possible, else the same loop eagerly.
        with clock("denoise"):
            graphed = self._graphed_step(sched, scheduler, karras, steps, cfg, latents, context)
            if graphed is not None:
                with graphed.lock:
                    latents = graphed.run(latents, context, guidance_scale, noise)
            else:
                state = sched.init_state(latents)
                for i in range(n_evals):
                    x = torch.cat([latents, latents]) if cfg else latents  # [(2)N, 4, h, w]
                    x = sched.scale_model_input(x, i)
                    eps = self.backend.unet(x, sched.timesteps[i], context).float()
                    if cfg:
                        eps_uncond, eps_text = eps.chunk(2)
                        eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                    latents = sched.step(eps, i, latents, state, noise=None if noise is None else noise[i])
        timings["unet_step"] = timings["denoise"] / n_evals if timed else 0.0

        # 4. Decode to [0, 1] NHWC float32.
        with clock("vae_decode"):
            latents = latents / self.scaling_factor
            image = self._call("vae_decode", self.backend.decode, latents).float()
            if self.dtype == torch.float16 and not torch.isfinite(image).all():
                image = self._decode_fp32(latents)
            image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        if timed:
            timings["end_to_end"] = sum(timings[k] for k in ("text_encoder", "denoise", "vae_decode"))

        if output_type == "np":
            return Result(image, timings)
        pil = to_pil(image)
        return Result(pil[0] if single and num_images == 1 else pil, timings)


def to_pil(images: np.ndarray):
    """[N, H, W, 3] floats in [0, 1] -> list of PIL images (rounded as diffusers does)."""
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype("uint8")) for im in images]


class _Clock:
    """Context-manager stopwatch for pipeline stages; synchronises the device only when timing."""

    def __init__(self, device: torch.device, enabled: bool, out: dict):
        self.device, self.enabled, self.out = device, enabled, out

    def __call__(self, stage: str):
        clock = self

        class _Stage:
            def __enter__(self):
                clock._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock._sync()
                if clock.enabled:
                    clock.out[stage] = time.perf_counter() - self.t0

        return _Stage()

    def _sync(self):
        if self.enabled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------
_cache: dict = {}
_cache_lock = threading.Lock()


def generate(
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    scheduler: str = "dpmpp_2m",
    num_images: int = 1,
    model: str | Path | None = None,
    backend: str = "auto",
    output_type: str = "pil",
):
    """Text to image in one call; keeps one loaded Pipeline per (model, backend) for reuse."""
    check_args(prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
    root = resolve_model(model)
    key = (str(root), backend)
    with _cache_lock:
        pipe = _cache.get(key)
        if pipe is None:
            pipe = _cache[key] = Pipeline.from_pretrained(root, backend=backend)
    return pipe.generate(
        prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        seed=seed,
        scheduler=scheduler,
        num_images=num_images,
        output_type=output_type,
    )
