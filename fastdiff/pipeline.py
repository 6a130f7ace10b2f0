"""The pipeline: tokenize, encode, denoise with classifier-free guidance, decode; img2img and
inpainting start from an encoded image (fastdiff.editing) and otherwise run the same stages.

The loop is shared by every backend (torch, onnxruntime, tensorrt): a backend only runs the three
networks. Latents are kept in float32 for the scheduler math whatever the network dtype, and the
initial noise is drawn exactly as diffusers' StableDiffusionPipeline draws it from
`torch.Generator("cpu").manual_seed(seed)`, so the same seed gives the same picture.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from fastdiff import editing, iospec, ops, precision, schedulers
from fastdiff import lora as lora_files  # `lora` is also an argument's name
from fastdiff.backends import BACKENDS, Backend, backend_class, make_backend
from fastdiff.backends import resolve as resolve_backend
from fastdiff.tokenizer import CLIPTokenizer
from fastdiff.weights import find_weights, parameter_count, read_config, read_configs, resolve_model

log = logging.getLogger("fastdiff")

OUTPUT_TYPES = ("pil", "np")
_MAX_GRAPHS = 4  # captured step graphs kept per pipeline
SCHEDULER_NAMES = schedulers.NAMES


@dataclass
class Result:
    """What one run produced: images (as requested) and the seconds each stage took."""

    images: object
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """One request's share of a batch (`Pipeline.run_batch`): what may differ between requests
    that share a denoising loop."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    guidance_scale: float = 7.5
    num_images: int = 1


class NonFiniteError(RuntimeError):
    """A stage produced NaN or inf: raised instead of returning a black image."""


@dataclass(frozen=True)
class Limits:
    """Caps on the work of one call, each refused with a ValueError naming it. The defaults keep a
    mistyped argument from allocating tens of GB; raise them with the environment variable named in
    `ENV` or with `Pipeline.from_pretrained(limits=Limits(...))`."""

    max_pixels: int = 1024 * 1024  # height * width of one image
    max_batch_pixels: int = 16 * 512 * 512  # images per call x height x width: 16 images at SD1.5's 512 px
    max_steps: int = 1000  # denoising steps (each scheduler may support fewer: see check_spacing)

    ENV = {"max_pixels": "FASTDIFF_MAX_PIXELS", "max_batch_pixels": "FASTDIFF_MAX_BATCH_PIXELS",
           "max_steps": "FASTDIFF_MAX_STEPS"}  # fmt: skip

    @classmethod
    def from_env(cls) -> "Limits":
        values = {}
        for f in fields(cls):
            var = cls.ENV[f.name]
            if os.environ.get(var):
                try:
                    values[f.name] = int(os.environ[var])
                except ValueError:
                    raise ValueError(f"{var}={os.environ[var]!r}: must be an integer") from None
                if values[f.name] < 1:
                    raise ValueError(f"{var}={values[f.name]}: must be >= 1")
        return cls(**values)

    def hint(self, name: str) -> str:
        return f"raise it with {self.ENV[name]} or Pipeline.from_pretrained(limits=Limits({name}=...))"


def _integer(name: str, value, lo: int, hi: int | None = None, what: str = "") -> int:
    """`value` as an int if it is an integer (numpy's too; bool is not) in [lo, hi], else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: must be an integer{what}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}={value}: must be {bounds}{what}")
    return value


def _texts(name: str, value) -> list[str]:
    """A prompt argument as a list of str: one string, or a non-empty list or tuple of strings."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) and value:
        items = list(value)
    else:
        raise ValueError(f"{name}={value!r}: give a string or a non-empty list of strings")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise ValueError(f"{name}: item {i} is a {type(text).__name__} ({text!r}); every prompt must be a str")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{name}: item {i} is not valid Unicode text (an unpaired surrogate at index {e.start})") from None
    return items


def check_args(
    prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type,
    seed=None, limits: Limits | None = None,
):
    """Every argument's type and range, checked before any model work; returns (prompts,
    negatives). The model's own rules (sizes, a scheduler's step range) are `check_request`'s."""
    limits = limits or Limits.from_env()
    prompts = _texts("prompt", prompt)
    negative = None
    if negative_prompt is not None:
        negative = _texts("negative_prompt", negative_prompt)
        if isinstance(negative_prompt, str):
            negative = negative * len(prompts)
        if len(negative) != len(prompts):
            raise ValueError(
                f"negative_prompt: got {len(negative)} negative prompts for {len(prompts)} prompts; "
                "give one string, or a list of the same length as prompt"
            )
    if _integer("steps", steps, 1) > limits.max_steps:
        raise ValueError(f"steps={steps}: over the limit of {limits.max_steps} ({limits.hint('max_steps')})")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r}: must be a finite number")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale={guidance_scale!r}: must be >= 0 (<= 1 turns guidance off)")
    for name, v in (("height", height), ("width", width)):
        if v is not None and _integer(name, v, 8, what=" (a multiple of 8, e.g. 512)") % 8:
            raise ValueError(f"{name}={v!r}: must be a multiple of 8 (e.g. 512)")
    if scheduler not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler={scheduler!r}: allowed values are {', '.join(SCHEDULER_NAMES)}")
    num_images = _integer("num_images", num_images, 1)
    if height is not None and width is not None:
        check_pixels(int(height), int(width), len(prompts) * num_images, limits)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type={output_type!r}: allowed values are {', '.join(OUTPUT_TYPES)}")
    if seed is not None and not 0 <= _integer("seed", seed, 0, what=" (or None for a random seed)") < 2**64:
        raise ValueError(f"seed={seed}: must be below 2**64 (torch.Generator's range)")
    return prompts, negative


def check_pixels(height: int, width: int, images: int, limits: Limits) -> None:
    if height * width > limits.max_pixels:
        raise ValueError(
            f"height={height}, width={width}: {height * width} pixels per image, over the limit of "
            f"{limits.max_pixels} ({limits.hint('max_pixels')})"
        )
    if images * height * width > limits.max_batch_pixels:
        raise ValueError(
            f"num_images: {images} images of {height}x{width} in one call are {images * height * width} pixels, over "
            f"the limit of {limits.max_batch_pixels} ({limits.hint('max_batch_pixels')})"
        )


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline reads from a model folder's small files (read once, before any weights)."""

    scheduler_config: schedulers.SchedulerConfig
    vae_scale_factor: int
    scaling_factor: float
    latent_channels: int  # the VAE's
    unet_in_channels: int  # latent_channels, or 2 * latent_channels + 1 for an inpainting UNet
    default_size: int  # px
    model_name: str

    @classmethod
    def read(cls, root: Path) -> "ModelFacts":
        """A damaged file raises ModelFileError naming it."""
        index = read_config(root / "model_index.json")
        configs = read_configs(root)
        unet, vae = configs["unet"], configs["vae"]
        f = iospec.vae_scale_factor(vae)
        return cls(
            scheduler_config=schedulers.SchedulerConfig.from_json(root / "scheduler" / "scheduler_config.json"),
            vae_scale_factor=f,
            scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            latent_channels=int(vae.get("latent_channels", 4)),
            unet_in_channels=int(unet.get("in_channels", 4)),
            default_size=int(unet.get("sample_size", 64)) * f,
            model_name=index.get("_name_or_path") or root.name,
        )


    @property
    def inpainting_unet(self) -> bool:
        """A 9-channel UNet (latents + mask + masked-image latents): it only inpaints."""
        return self.unet_in_channels == 2 * self.latent_channels + 1


def size_step(facts: ModelFacts, backend: Backend | None) -> int:
    """The px multiple image sides must have: the VAE's scale factor, times an exported UNet's rule."""
    return facts.vae_scale_factor * (backend.latent_multiple if backend is not None else 1)


def check_request(facts: ModelFacts, limits: Limits, steps: int, height, width, scheduler: str, images: int,
                  backend: Backend | None = None, device="cpu", edit: editing.EditInputs | None = None):
    """The model's own rules for one call, from its small files, checked before any model work:
    its size rule (on `backend`, whose export may narrow it), the pixel limits, the scheduler's
    step range for its timestep spacing and img2img's strength, and which modes its UNet runs.
    Returns (height, width, scheduler object on `device`)."""
    if facts.unet_in_channels not in (facts.latent_channels, 2 * facts.latent_channels + 1):
        raise ValueError(f"{facts.model_name}: a UNet with {facts.unet_in_channels} input channels is neither a "
                         f"{facts.latent_channels}-channel nor an inpainting UNet")
    if facts.inpainting_unet and (edit is None or edit.mode != "inpaint"):
        raise ValueError(f"mask_image: {facts.model_name} is an inpainting model (a {facts.unet_in_channels}-channel UNet); "
                         "give image= and mask_image=")
    if edit is not None:
        height, width = edit.height, edit.width
        if backend is not None and not backend.encodes_images:
            raise ValueError(f"image: backend={backend.name!r} has no VAE encoder (img2img and inpainting need one); use backend='torch'")
    height, width = int(height or facts.default_size), int(width or facts.default_size)
    f, multiple = facts.vae_scale_factor, size_step(facts, backend)
    for name, v in (("height", height), ("width", width)):
        if v % multiple:
            also = "" if multiple == f else f"; backend='torch' takes multiples of {f} px"
            raise ValueError(f"{name}={v}: the {backend.name if backend else 'torch'} backend of this model takes multiples of {multiple} px{also}")
    static = backend.static_size if backend is not None else None  # an export traced at one size takes only it
    if static and (height, width) != static:
        raise ValueError(
            f"height={height}, width={width}: this {backend.name} export is static, {static[0]}x{static[1]} px only; "
            "export it without --static for other sizes"
        )
    check_pixels(height, width, images, limits)
    sched = schedulers.shared_scheduler(scheduler, facts.scheduler_config, int(steps), device=device, dtype=torch.float32,
                                        strength=edit.strength if edit is not None else 1.0)
    return height, width, sched


def read_edit(facts: ModelFacts, image, mask_image, strength, height, width, backend: Backend | None = None,
              limits: Limits | None = None):
    """`editing.read_inputs` at this model's (and backend's) size step and pixel limit: None for
    text to image."""
    max_pixels = (limits or Limits.from_env()).max_pixels
    return editing.read_inputs(image, mask_image, strength, height, width, scale=facts.vae_scale_factor,
                               multiple=size_step(facts, backend), max_pixels=max_pixels)  # fmt: skip


class WeightsLock:
    """Many generations read the weights at once; an adapter swap waits for them and holds new
    ones back until it is done (writers first), so no generation sees half-merged weights."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._waiting_writers = 0

    @contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._waiting_writers)
            self._readers += 1
        with self._held():
            yield

    @contextmanager
    def _held(self):
        """A read lock already taken, given back when the block ends."""
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def changing(self, change):
        """Run `change()` once no generation reads the weights (new ones wait), then hold them for
        reading from that same moment: the caller's generation runs with the change it asked for,
        before any other change can start. If `change` raises, nothing is held."""
        with self._cond:
            self._waiting_writers += 1
            self._cond.wait_for(lambda: not self._writing and not self._readers)
            self._waiting_writers -= 1
            self._writing = True
        try:
            change()
        except BaseException:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
            raise
        with self._cond:  # writer -> reader in one step: no other change comes in between
            self._writing = False
            self._readers += 1
            self._cond.notify_all()
        with self._held():
            yield


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
        limits: Limits | None = None,
        facts: ModelFacts | None = None,
    ):
        self.root, self.backend, self.tokenizer = root, backend, tokenizer
        self.device, self.dtype = device, dtype
        self.cuda_graph = cuda_graph
        self.limits = limits or Limits.from_env()
        self._graphs: dict = {}  # GraphKey -> GraphedStep
        self._calls: dict = {}  # (network, input shape, dtype, kernel mode) -> GraphedCall
        self._graphs_lock = threading.Lock()
        self.facts = facts or ModelFacts.read(root)
        self.weights_lock = WeightsLock()  # generations read, adapter changes write
        self.adapters: dict[str, float] = {}  # the LoRA adapters merged now: {path: weight}
        self.captures = 0  # CUDA graphs captured so far (a swap must not add any)
        self._lora_modules: dict[str, set[str]] | None = None  # what adapters may adapt (read on first use)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        backend: str = "auto",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        kernels: str | None = None,
        cuda_graph: bool = True,
        channels_last: bool | None = None,
        limits: Limits | None = None,
        config: str | Path | None = None,
    ) -> "Pipeline":
        """Load `model` (a name, a diffusers-format folder, or a single-file .safetensors
        checkpoint in the CompVis/LDM layout) onto `backend`.

        dtype: the networks' dtype; None: `fastdiff.precision.default_dtype` (float16 on CUDA,
            bfloat16 on CPUs with AMX-BF16 / AVX512-BF16 for models of SD1.5's size, else float32).
        kernels: "torch" | "triton" | "auto" | None (FASTDIFF_KERNELS) for the torch backend's ops.
        cuda_graph: capture each denoising step in one CUDA graph on GPU (False: eager, for debugging).
        channels_last: the torch backend's UNet and VAE in NHWC memory order (same function).
            None: on for CUDA (measured faster there: the torch:nchw runner of benchmarks/latency.py,
            figures in benchmarks/NOTES-gpu.md), off on CPU (not measured faster there).
        limits: caps on one call's work (default: `Limits.from_env()`).
        config: for a single-file checkpoint, the diffusers folder whose configs it follows
            (default: SD1.5's).
        """
        device = torch.device(device) if device is not None else _default_device()
        backend = resolve_backend(backend, device)  # ValueError for an unknown name
        if dtype is not None:
            dtype = precision.check_dtype(device, dtype)  # a bad dtype is named before any model work
        root = resolve_model(model, config)
        facts = ModelFacts.read(root)  # the small files first: a damaged one is named before weights load
        if dtype is None:  # fp16 on CUDA; on CPU bf16 where it runs natively, pays, and the backend has it
            unet_params = parameter_count(find_weights(root / "unet")) if device.type == "cpu" else None  # only the CPU rule reads it
            dtype = precision.choose_dtype(device, None, backend_class(backend).dtypes, unet_params)
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        net = make_backend(backend, root, device=device, dtype=dtype, kernels=kernels, channels_last=channels_last)
        log.info("fastdiff: loaded %s on %s (%s, backend %s)", root, device, dtype, net.name)
        return cls(root, net, tokenizer, device=device, dtype=dtype, cuda_graph=cuda_graph, limits=limits, facts=facts)

    # ------------------------------------------------------------------------------------------
    def _graphs_enabled(self) -> bool:
        return self.cuda_graph and self.device.type == "cuda" and self.backend.capturable

    def _graphed_step(self, sched, name, steps, cfg, latents, context, inpaint=None):
        """The captured step for these settings (captured on first use), or None when not on CUDA."""
        if not self._graphs_enabled():
            return None
        from fastdiff.graphs import GraphedStep, GraphKey

        key = GraphKey(
            tuple(latents.shape), tuple(context.shape), name, sched.karras, steps, sched.start,
            inpaint.kind if inpaint is not None else "", cfg, self.dtype, self._kernel_mode(),
        )  # fmt: skip
        return self._captured(
            self._graphs, key, _MAX_GRAPHS, lambda: GraphedStep(key, sched, self.backend.unet, self.device, inpaint)
        )

    def _kernel_mode(self) -> str:
        """The ops mode the backend's calls run under now: part of every capture's key."""
        return self.backend.kernels or ops.get_kernels()

    def _captured(self, cache: dict, key, limit: int, make):
        """cache[key], made by `make()` on first use; the oldest capture is dropped past `limit`."""
        with self._graphs_lock:
            graphed = cache.get(key)
            if graphed is None:
                if len(cache) >= limit:  # bound memory: drop the oldest capture
                    cache.pop(next(iter(cache)))
                graphed = cache[key] = make()
                self.captures += 1
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
        if not self.backend.fp32_decode:
            raise RuntimeError(
                f"the fp16 VAE decode gave NaN/inf and the {self.backend.name!r} backend "
                "has no fp32 VAE to decode again with; use backend='torch' or dtype=torch.float32 for this model"
            )
        if not getattr(self, "_warned_fp32_decode", False):
            log.warning("fastdiff: fp16 VAE decode overflowed; decoding in fp32 (slower) from now on when needed")
            self._warned_fp32_decode = True
        return self.backend.decode_fp32(latents).float()

    def _nonfinite_message(self, stage: str, where: str, network: str, cause: str = "") -> str:
        """What went NaN/inf, where, and the likely cause: for the torch backend the first weight
        tensor of `network` that holds NaN/inf is named (scanned only on this error path)."""
        bad = self.backend.nonfinite_weight(network)
        if bad is not None:
            cause = f"the {network} weight {bad} holds NaN/inf: the checkpoint is damaged; "
        return (
            f"the {stage} produced NaN/inf at {where} ({self.facts.model_name}, backend {self.backend.name}); "
            f"{cause or 'likely causes: NaN/inf in the weights, or inputs far outside their usual range; '}"
            "no image was returned"
        )

    def generate(
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
        image=None,
        mask_image=None,
        strength: float | None = None,
        lora: dict | None = None,
    ):
        """One PIL.Image for one prompt and one image, else a list; output_type="np" gives
        float32 [N, H, W, 3] in [0, 1]. The arguments are `run`'s (tests/test_bad_inputs.py keeps
        the three signatures equal).

        image: img2img's start (a PIL image of any mode, a numpy array [H, W(, C)] uint8 or float
            in [0, 1], or a file path); the output has its size unless height / width are given.
        mask_image: with image, inpainting: white repaints, black keeps (binarised at 0.5).
        strength: how much of the schedule runs from the image, in (0, 1]; default 0.8 for
            img2img, 1.0 for inpainting (diffusers' defaults).
        lora: LoRA adapters for this call, {path to .safetensors: weight} ({} for none), merged
            first when they differ from the merged ones (`set_adapters`) and kept merged after;
            None: whichever are merged now.
        """
        return self.run(**arguments(locals())).images

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
        image=None,
        mask_image=None,
        strength: float | None = None,
        lora: dict | None = None,
        timed: bool = False,
    ) -> Result:
        """Like `generate`, returning a `Result` with per-stage seconds (synchronised when timed)."""
        single = isinstance(prompt, str)
        prompts, negative = check_args(
            prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type,
            seed, self.limits,
        )
        edit = read_edit(self.facts, image, mask_image, strength, height, width, self.backend, self.limits)
        lora_weights = lora_files.check_weights(lora) if lora is not None else None
        n = len(prompts) * int(num_images)
        height, width, sched = check_request(
            self.facts, self.limits, steps, height, width, scheduler, n, self.backend, self.device, edit
        )
        guidance_scale = float(guidance_scale)

        with self.adapters_merged(lora_weights):  # an adapter change waits for this call, and this call for it
            timings: dict[str, float] = {}
            clock = _Clock(self.device, timed, timings)
            cfg = guidance_scale > 1.0  # as diffusers: guidance off at <= 1
            with clock("text_encoder"):
                context = self.encode_prompt(prompts, negative if cfg else None, num_images, cfg)
            generator = torch.Generator("cpu")
            generator.manual_seed(int(seed) if seed is not None else int(torch.seed() % 2**63))
            inpaint = None
            if edit is None:
                latents, noise = self.initial_latents(generator, sched, n, height, width)
            else:
                with clock("vae_encode"):
                    latents, noise, inpaint = self.edit_latents(edit, generator, sched, n, cfg)
            with clock("denoise"):
                latents = self.denoise(sched, scheduler, latents, context, guidance_scale, noise, inpaint)
            timings["unet_step"] = timings["denoise"] / len(sched.timesteps) if timed else 0.0
            with clock("vae_decode"):
                image = self.decode(latents)
        if timed:
            timings["end_to_end"] = sum(timings.get(k, 0.0) for k in ("text_encoder", "vae_encode", "denoise", "vae_decode"))

        if output_type == "np":
            return Result(image, timings)
        pil = to_pil(image)
        return Result(pil[0] if single and num_images == 1 else pil, timings)

    def run_batch(
        self,
        jobs: list[Job],
        *,
        steps: int = 25,
        height: int | None = None,
        width: int | None = None,
        scheduler: str = "dpmpp_2m",
        pad_to: int | None = None,
        timed: bool = False,
    ) -> list[Result]:
        """Text to image for several requests in one denoising loop: one Result per job, its
        images float32 [num_images, H, W, 3], the same as `run` gives that job alone (each job's
        noise from its own seed's generator, its own guidance and negative prompt; equal up to
        rounding that depends on the batch size). Jobs either all use guidance (> 1) or none.
        pad_to: run at least this many rows, the extra ones discarded, so that CUDA graphs are
        captured per padded size (a bounded set) rather than per batch size."""
        if not jobs:
            raise ValueError("jobs: give at least one")
        for job in jobs:
            check_args(job.prompt, job.negative_prompt, steps, job.guidance_scale, height, width, scheduler,
                       job.num_images, "np", job.seed, self.limits)  # fmt: skip
        cfg = {job.guidance_scale > 1.0 for job in jobs}
        if len(cfg) > 1:
            raise ValueError("jobs: guidance_scale > 1 in some jobs and <= 1 (no guidance) in others; batch them apart")
        cfg = cfg.pop()
        n = sum(job.num_images for job in jobs)
        rows = max(n, pad_to or 0)
        height, width, sched = check_request(self.facts, self.limits, steps, height, width, scheduler, rows,
                                             self.backend, self.device)  # fmt: skip
        per_row = [job for job in jobs for _ in range(job.num_images)]
        per_row += per_row[-1:] * (rows - n)  # padding rows repeat the last; their images are dropped
        with self.weights_lock.reading():
            timings: dict[str, float] = {}
            clock = _Clock(self.device, timed, timings)
            with clock("text_encoder"):
                negative = [job.negative_prompt or "" for job in per_row]
                context = self.encode_prompt([job.prompt for job in per_row], negative if cfg else None, 1, cfg)
            drawn = [self.initial_latents(torch.Generator("cpu").manual_seed(int(job.seed)), sched, job.num_images,
                                          height, width) for job in jobs]  # fmt: skip
            pad = torch.zeros(self.latent_shape(rows - n, height, width), device=self.device)
            latents = torch.cat([lat for lat, _ in drawn] + [pad])  # [rows, C, h, w]
            noise = None
            if sched.needs_noise:
                pad_noise = torch.zeros((len(sched.timesteps), *pad.shape), device=self.device)
                noise = torch.cat([nz for _, nz in drawn] + [pad_noise], dim=1)  # [steps, rows, C, h, w]
            guidance = torch.tensor([job.guidance_scale for job in per_row], dtype=torch.float32, device=self.device)
            with clock("denoise"):
                latents = self.denoise(sched, scheduler, latents, context, guidance.reshape(-1, 1, 1, 1), noise)
            timings["unet_step"] = timings["denoise"] / len(sched.timesteps) if timed else 0.0
            with clock("vae_decode"):
                images = self.decode(latents)  # [rows, H, W, 3]
        timings["end_to_end"] = sum(timings.get(k, 0.0) for k in ("text_encoder", "denoise", "vae_decode"))
        starts = np.cumsum([0] + [job.num_images for job in jobs])
        return [Result(images[a:b], timings) for a, b in zip(starts[:-1], starts[1:])]

    def set_adapters(self, adapters: dict | None) -> None:
        """Merge LoRA adapters ({path to .safetensors: weight}, fastdiff.lora's layouts) into the
        weights, replacing the ones merged before; None or {} restores the base weights (bit for
        bit on the torch backend). Files are read and checked before anything changes.

        torch: merged in place, waiting for running generations and holding new ones until done;
        captured CUDA graphs stay valid (same storage). onnxruntime / OpenVINO / TensorRT: an
        export of the merged modules (cached, keyed by the adapters' content and weights; made on
        first use, minutes for SD1.5) is built while generations go on, then swapped in."""
        with self.adapters_merged(lora_files.check_weights(adapters)):
            pass

    @contextmanager
    def adapters_merged(self, adapters: dict[str, float] | None):
        """Hold the weights for reading with `adapters` (checked, {} for none) merged; None:
        whichever are merged now. A change is prepared first (files read and checked, an export
        built) without blocking anyone, then applied when no generation runs."""
        with self.weights_lock.reading():
            if adapters is None or adapters == self.adapters:
                yield
                return
        change = self._adapter_change(adapters)  # ValueErrors here, before any change
        with self.weights_lock.changing(change):
            yield

    def _adapter_change(self, adapters: dict[str, float]):
        """A function that makes `adapters` the merged ones; what can fail is done here first."""
        if self._lora_modules is None:
            self._lora_modules = lora_files.model_modules(read_configs(self.root))
        if self.backend.merges_lora:
            layers, weights = lora_files.read_adapters(adapters, self._lora_modules)

            def change():
                if self.adapters != adapters:  # a call that wanted the same may have got there first
                    self.backend.merge(layers, weights)
                    self.adapters = adapters
        else:
            lora_files.read_adapters(adapters, self._lora_modules)  # named errors before minutes of export
            backend = type(self.backend).create(self.root, device=self.device, dtype=self.dtype, adapters=adapters or None)

            def change():
                self.backend, self.adapters = backend, adapters
                with self._graphs_lock:  # captures of the old backend's calls
                    self._graphs.clear()
                    self._calls.clear()

        return change

    # ------------------------------------------------------------------------------------------
    # The stages of a run, each usable on its own (img2img and inpainting start denoising from
    # other latents; the text and decode stages are the same).

    def encode_prompt(self, prompts: list[str], negative: list[str] | None, num_images: int, cfg: bool) -> torch.Tensor:
        """Text embeddings [(2)N, 77, D]: with guidance the negative (or empty) prompts first, each
        prompt repeated num_images times."""
        ids = self.tokenizer(prompts)  # [B, 77]
        if cfg:
            ids = torch.cat([self.tokenizer(negative or [""] * len(prompts)), ids])  # [2B, 77]
        context = self._call("text_encoder", self.backend.encode_text, ids)  # [(2)B, 77, D]
        if not torch.isfinite(context).all():
            raise NonFiniteError(self._nonfinite_message("text encoder", "its output", "text_encoder"))
        return context.repeat_interleave(num_images, dim=0)  # [(2)N, 77, D]

    def draw(self, generator: torch.Generator, shape: tuple) -> torch.Tensor:
        """Standard normal noise drawn as diffusers' randn_tensor draws it (CPU generator, network
        dtype), as float32 on the device."""
        return torch.randn(shape, generator=generator, dtype=self.dtype).to(self.device, torch.float32)

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.facts.vae_scale_factor
        return n, self.facts.latent_channels, height // f, width // f

    def step_noise(self, generator: torch.Generator, sched, shape: tuple) -> torch.Tensor | None:
        """An ancestral sampler's per-step noise [steps, *shape] (drawn after everything else, in
        step order, as diffusers' scheduler draws it inside the loop), else None."""
        return self.draw(generator, (len(sched.timesteps), *shape)) if sched.needs_noise else None

    def initial_latents(self, generator: torch.Generator, sched, n: int, height: int, width: int):
        """(latents [N, C, h, w], per-step noise [steps, N, C, h, w] or None), float32 on the device,
        drawn as diffusers draws them: the latents first, scaled; the per-step noise next."""
        shape = self.latent_shape(n, height, width)
        latents = self.draw(generator, shape) * sched.init_noise_sigma
        return latents, self.step_noise(generator, sched, shape)

    def edit_latents(self, edit: editing.EditInputs, generator: torch.Generator, sched, n: int, cfg: bool):
        """img2img's and inpainting's (latents, per-step noise, Inpainting or None), drawn from
        `generator` in diffusers' order: the image's latents, the initial noise, the masked image's
        latents, the per-step noise. One image serves all n rows."""
        shape = self.latent_shape(n, edit.height, edit.width)
        inpainting = edit.mode == "inpaint"
        nine = self.facts.inpainting_unet
        known = None
        if not inpainting or edit.strength < 1 or not nine:  # where diffusers encodes the image
            known = self.image_latents(edit.image, generator).expand(shape)  # [N, C, h, w]
        noise = self.draw(generator, shape)
        if inpainting and edit.strength == 1:  # StableDiffusionInpaintPipeline starts from pure noise...
            latents = noise * sched.init_noise_sigma
        else:  # ...its img2img pipeline always noises the image to the first step
            latents = sched.add_noise(known, noise)
        inpaint = None
        if inpainting:
            mask = edit.latent_mask.to(self.device).expand(n, -1, -1, -1)  # [N, 1, h, w]
            if nine:
                masked = self.image_latents(edit.image * (edit.mask < 0.5), generator).expand(shape)  # [N, C, h, w]
                concat = torch.cat([mask, masked], dim=1)  # [N, 1 + C, h, w]
                inpaint = editing.Inpainting(concat=torch.cat([concat, concat]) if cfg else concat)
            else:
                self.draw(generator, (1, *shape[1:]))  # diffusers encodes the masked image for any UNet: its draw, unused
                inpaint = editing.Inpainting(known=known, noise=noise, mask=mask)
        return latents, self.step_noise(generator, sched, shape), inpaint

    def image_latents(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """image [N, 3, H, W] in [-1, 1] -> its scaled latents [N, C, H / f, W / f], float32 on the
        device, drawn from the encoder's Gaussian as diffusers' `latent_dist.sample(generator)`
        draws them (CPU generator, network dtype) and times the scaling factor: img2img's start."""
        if not self.backend.encodes_images:
            raise ValueError(f"backend={self.backend.name!r} has no VAE encoder (img2img needs one); use backend='torch'")
        mean, logvar = self.backend.encode_image(image)
        sample = self.draw(generator, mean.shape)
        return (mean + torch.exp(0.5 * logvar) * sample) * self.facts.scaling_factor

    def denoise(self, sched, scheduler: str, latents, context, guidance_scale: float | torch.Tensor, noise=None,
                inpaint: editing.Inpainting | None = None) -> torch.Tensor:
        """Every step of `sched` from `latents`: one captured CUDA graph per step where possible,
        else the same loop eagerly. NaN/inf in the result raises NonFiniteError naming the step.
        guidance_scale: one number, or one per sample ([N, 1, 1, 1] on the device, all > 1)."""
        cfg = bool((torch.as_tensor(guidance_scale) > 1.0).all())
        n_evals = len(sched.timesteps)
        graphed = self._graphed_step(sched, scheduler, sched.num_steps, cfg, latents, context, inpaint)
        first_bad = None  # the first step whose latents are not finite, tracked on the device (no sync)
        if graphed is not None:
            with graphed.lock:
                latents = graphed.run(latents, context, guidance_scale, noise, inpaint)
        else:
            state = sched.init_state(latents)
            first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
            for i in range(n_evals):
                x = torch.cat([latents, latents]) if cfg else latents  # [(2)N, 4, h, w]
                x = sched.scale_model_input(x, i)
                if inpaint is not None:
                    x = inpaint.unet_input(x)  # [(2)N, 9, h, w] for an inpainting UNet
                eps = self.backend.unet(x, sched.timesteps[i], context).float()
                if cfg:
                    eps_uncond, eps_text = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
                latents = sched.step(eps, i, latents, state, noise=None if noise is None else noise[i])
                if inpaint is not None:
                    latents = inpaint.blend(sched, latents, i)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(latents).all(), i, first_bad)
        if not torch.isfinite(latents).all():
            at = "a step of the captured graph" if first_bad is None else f"step {int(first_bad) + 1} of {n_evals}"
            cause = ""
            worst = float(torch.as_tensor(guidance_scale).abs().max())
            if cfg and worst > 100:
                cause = f"guidance_scale={worst:g} (usual: 1-20) overflows the guided noise prediction; "
            raise NonFiniteError(self._nonfinite_message("denoising loop", at, "unet", cause))
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> images [N, H, W, 3] float32 in [0, 1]; an fp16 decode that overflows is
        redone in fp32, and NaN/inf left after that raises NonFiniteError."""
        latents = latents / self.facts.scaling_factor
        image = self._call("vae_decode", self.backend.decode, latents).float()
        if self.dtype == torch.float16 and not torch.isfinite(image).all():
            image = self._decode_fp32(latents)
        if not torch.isfinite(image).all():
            raise NonFiniteError(self._nonfinite_message("VAE decode", "its output", "vae"))
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]


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
# Loaded pipelines of generate(), one Future per (model folder, backend): a load or export runs
# outside the lock, so calls to pipelines already loaded never wait on it, and two threads asking
# for the same new pipeline share one load.
_cache: dict[tuple[str, str], Future] = {}
_cache_lock = threading.Lock()  # guards _cache itself, never held during a load


def cache_key(root: Path, backend: str) -> tuple[str, str]:
    return str(Path(root).resolve()), backend


def cached_pipeline(root: Path, backend: str) -> Pipeline:
    """The shared Pipeline for (root, backend), loaded on first use. A failed load is not kept:
    every caller waiting on it gets its error, and the next call tries again."""
    key = cache_key(root, backend)
    with _cache_lock:
        future = _cache.get(key)
        owner = future is None
        if owner:
            future = _cache[key] = Future()
    if owner:
        try:
            future.set_result(Pipeline.from_pretrained(root, backend=backend))
        except BaseException as e:
            with _cache_lock:
                _cache.pop(key, None)
            future.set_exception(e)
    return future.result()


def arguments(scope: dict, *drop: str) -> dict:
    """A function's own arguments from its locals() at entry, less `self` and `drop`: forwarding
    them without writing each name again."""
    return {k: v for k, v in scope.items() if k != "self" and k not in drop}


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
    image=None,
    mask_image=None,
    strength: float | None = None,
    lora: dict | None = None,
):
    """Text to image, img2img (image=) or inpainting (image= and mask_image=) in one call; keeps
    one loaded Pipeline per (model, backend) for reuse. `lora` ({path: weight}) runs this call
    with those LoRA adapters merged; None runs it without any (whatever other calls asked for).
    The other arguments are `Pipeline.generate`'s."""
    options = arguments(locals(), "model", "backend")  # first: locals() holds just the arguments
    options["lora"] = lora_files.check_weights(lora)  # None -> {}: the base weights
    prompts, _ = check_args(
        prompt, negative_prompt, steps, guidance_scale, height, width, scheduler, num_images, output_type, seed
    )
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
    root = resolve_model(model)
    if cache_key(root, backend) not in _cache:  # before a first load; a loaded pipeline checks in run()
        facts = ModelFacts.read(root)
        if options["lora"]:  # named ValueErrors before minutes of loading
            lora_files.read_adapters(options["lora"], lora_files.model_modules(read_configs(root)))
        edit = read_edit(facts, image, mask_image, strength, height, width)
        check_request(facts, Limits.from_env(), steps, height, width, scheduler, len(prompts) * int(num_images),
                      edit=edit)  # fmt: skip
    return cached_pipeline(root, backend).generate(**options)
