"""Side-by-side latency and parity: fastdiff's backends against diffusers, in one run.

    python benchmarks/latency.py                                   # small default model, all backends
    python benchmarks/latency.py --model sd15 --random-weights --height 256 --width 256 --steps 4
    python benchmarks/latency.py --gate benchmarks/gate.json --json out.json --report out/
    python benchmarks/latency.py --strength 0.75                   # img2img, against StableDiffusionImg2ImgPipeline

The reference is diffusers' StableDiffusionPipeline loaded from the same folder, on the same
device and dtype, prompt, seed, scheduler and step count (with --strength: its
StableDiffusionImg2ImgPipeline on the same input image; the steps run are the last
int(steps * strength)). Runs are interleaved (ref, backend 1,
backend 2, ref, ...) after warm-up, so drift of the machine hits every runner alike, and each
speed-up is taken pair by pair (the ratio of repeat r to repeat r) before the median. On the
CPU each runner lives in a process of its own (`Isolated`; --same-process to share this one):
process-wide settings such as a CPU torch backend's allocator then stay with their runner.

Stages, the same boundaries for both sides:
  text_encoder  fastdiff: its timer (tokenize + encode); diffusers: first text-encoder forward
                pre-hook to last forward hook (both prompts' encodes).
  denoise       fastdiff: its timer; diffusers: first UNet pre-hook to the VAE-decode pre-hook
                (so the last scheduler step is inside, as in fastdiff).
  unet_step     denoise / number of UNet evaluations (scheduler and guidance included).
  vae_decode    fastdiff: its timer (decode + to numpy); diffusers: VAE-decode pre-hook to the
                pipeline's return (decode + postprocess to numpy).
  end_to_end    wall clock around the whole call, for both.
Hooks are torch's public module hooks; on CUDA they synchronise at the stage boundaries.

The physical limit: the UNet's FLOPs per evaluation (FlopCounterMode on fastdiff's UNet with the
classifier-free-guidance batch) over the measured step time, against a dense matmul rate measured
in the same run (interleaved with the repeats).

--gate FILE checks speed-up ratios and parity against thresholds (never absolute times) and
exits 1 naming every threshold missed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastdiff import schedulers, testing

REF = "diffusers"
DEFAULT = "default"  # fastdiff as a user gets it: no backend, no dtype named (runs without --backends)
PEER = "openvino-peer"  # the OpenVINO runners of benchmarks/openvino_peer.py: a second reference
STAGES = ("text_encoder", "unet_step", "denoise", "vae_decode", "end_to_end")
LABELS = {
    "text_encoder": "text encoder",
    "unet_step": "UNet per step",
    "denoise": "denoising loop",
    "vae_decode": "VAE decode",
    "end_to_end": "end-to-end",
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
GATE_KEYS = ("min_speedup", "max_abs", "min_psnr_db")
PSNR_CAP_DB = 200.0  # identical images: report this instead of infinity (JSON has no inf)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/latency.py",
        description="Latency and parity of fastdiff's backends against diffusers, side by side.",
    )
    p.add_argument("--model", default=None,
                   help="a name (tiny-shapes, sd15), a diffusers-format folder; default: the embedded "
                        "model if present, else a small random-weight model of its architecture")
    p.add_argument("--random-weights", action="store_true",
                   help="with --model sd15: SD1.5's architecture with seeded random weights (no download)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="dpmpp_2m", choices=schedulers.NAMES)
    p.add_argument("--batch", type=int, default=1, help="images per call (the prompt repeated)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--strength", type=float, default=None,
                   help="img2img from a fixed input image (input_image()) at this strength, in (0, 1]")
    p.add_argument("--prompt", default="a small red circle on the left on a blue background")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default=None,
                   help="comma list of fastdiff backends; default: every backend available here. "
                        "Suffixes change one setting: torch:nograph (no CUDA graph), "
                        "torch:nograph:torchops (and torch reference ops instead of Triton), torch:triton (the Triton kernels "
                        "at every shape, no SDPA where it timed faster), torch:nchw / torch:channels_last")
    p.add_argument("--peers", default="auto", choices=("auto", "none", "fp32", "bf16", "fp32,bf16"),
                   help="the OpenVINO peer (benchmarks/openvino_peer.py) at these precisions; auto: on the CPU, "
                        "fp32, and bf16 where the CPU has bf16 instructions, when openvino is installed")
    p.add_argument("--same-process", action="store_true",
                   help="CPU: run every runner in this process (default: each in its own, see Isolated)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES), help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--json", type=Path, default=None, help="write machine-readable results here")
    p.add_argument("--report", type=Path, default=None, help="write report.md and comparison PNGs here")
    p.add_argument("--gate", type=Path, default=None, help="thresholds JSON; exit 1 if any is missed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.random_weights and args.model != "sd15":
        p.error("--random-weights goes with --model sd15")
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1 or args.batch < 1:
        p.error("--repeats, --steps and --batch must be >= 1, --warmup >= 0")
    if args.strength is not None:
        try:
            schedulers.start_step(args.steps, args.strength)  # the pipeline's own rule
        except ValueError as e:
            p.error(f"--strength: {e}")
    return args


# ----------------------------------------------------------------------------------------------
# model folder


def resolve_folder(args, tmp: Path) -> tuple[Path, str]:
    """The diffusers-format folder both sides load, and a line saying what it is."""
    if args.random_weights:
        print("building SD1.5 architecture with random weights (seed %d) ..." % args.seed, file=sys.stderr)
        folder = testing.build_random_folder(tmp / "sd15-random", "sd15", seed=args.seed)
        return folder, f"sd15 architecture, random weights (seed {args.seed})"
    if args.model is None or args.model == "tiny-shapes":
        if (testing.TINY_SHAPES / "model_index.json").exists():
            return testing.TINY_SHAPES, "tiny-shapes (embedded, trained)"
        if args.model == "tiny-shapes":
            raise FileNotFoundError(f"{testing.TINY_SHAPES} is not in this checkout")
        folder = testing.build_random_folder(tmp / "tiny-random", "tiny", seed=args.seed)
        return folder, f"tiny-shapes architecture, random weights (seed {args.seed}; embedded model not present)"
    if Path(args.model).is_dir():
        return Path(args.model), str(args.model)
    from fastdiff.weights import resolve_model

    return Path(resolve_model(args.model)), args.model


def image_size(folder: Path, height: int | None, width: int | None) -> tuple[int, int]:
    """The size diffusers and fastdiff both default to: UNet sample_size x VAE scale factor."""
    unet = testing.read_json(folder / "unet" / "config.json")
    vae = testing.read_json(folder / "vae" / "config.json")
    side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    return height or side, width or side


def input_image(height: int, width: int):
    """img2img's input: a large red disc on a grey-blue gradient, the same for every runner."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    bg = np.stack([100 + 60 * x / width, 110 + 40 * y / height, 170 - 50 * x / width], axis=-1)  # [H, W, 3]
    image = Image.fromarray(bg.round().astype(np.uint8))
    r = min(height, width) * 0.3
    ImageDraw.Draw(image).ellipse((width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r), fill=(220, 30, 30))
    return image


def edit_args(args) -> dict:
    """What img2img adds to a call (nothing without --strength); made once per runner, outside
    the timed calls."""
    return {} if args.strength is None else {"image": input_image(args.height, args.width), "strength": args.strength}


# ----------------------------------------------------------------------------------------------
# runners: each call returns (images [N, H, W, 3] float32 in [0, 1], {stage: seconds})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DiffusersRunner:
    """diffusers' StableDiffusionPipeline, with per-stage times from forward hooks."""

    name = REF

    def __init__(self, folder: Path, args, device: torch.device, dtype: torch.dtype):
        import diffusers

        self.args, self.device, self.dtype = args, device, dtype
        self.edit = edit_args(args)
        kind = diffusers.StableDiffusionPipeline if args.strength is None else diffusers.StableDiffusionImg2ImgPipeline
        self.pipe = kind.from_pretrained(folder, dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        entry = schedulers.REGISTRY[args.scheduler]
        self.pipe.scheduler = getattr(diffusers, entry.diffusers_class).from_config(
            self.pipe.scheduler.config, **entry.diffusers_config
        )
        self.events: list[tuple[str, float]] = []
        self._hook_stages()

    def _hook_stages(self) -> None:
        pipe = self.pipe

        def mark(event: str, always_sync: bool = True):
            def hook(module, *_):
                # Sync only where a stage boundary may fall: every UNet call would add launch gaps.
                if always_sync or not any(e == event for e, _ in self.events):
                    _sync(self.device)
                    self.events.append((event, time.perf_counter()))

            return hook

        pipe.text_encoder.register_forward_pre_hook(mark("text_pre"))
        pipe.text_encoder.register_forward_hook(mark("text_post"))
        pipe.unet.register_forward_pre_hook(mark("unet_pre", always_sync=False))
        pipe.unet.register_forward_pre_hook(self._count_unet)
        # AutoencoderKL.decode runs post_quant_conv (when the config uses it) then the decoder.
        vae = pipe.vae
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(mark("vae_pre"))

    def _count_unet(self, module, *_):
        self.unet_calls += 1

    def __call__(self):
        a = self.args
        self.events, self.unet_calls = [], 0
        _sync(self.device)
        t0 = time.perf_counter()
        size = {"height": a.height, "width": a.width} if a.strength is None else {}  # img2img: the image's size
        images = self.pipe(
            prompt=[a.prompt] * a.batch,
            num_inference_steps=a.steps,
            guidance_scale=a.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(a.seed),
            output_type="np",
            **size,
            **self.edit,
        ).images
        _sync(self.device)
        t1 = time.perf_counter()
        first = {}
        last = {}
        for event, t in self.events:
            first.setdefault(event, t)
            last[event] = t
        denoise = first["vae_pre"] - first["unet_pre"]
        times = {
            "text_encoder": last["text_post"] - first["text_pre"],
            "denoise": denoise,
            "unet_step": denoise / self.unet_calls,
            "vae_decode": t1 - first["vae_pre"],
            "end_to_end": t1 - t0,
        }
        return np.asarray(images, dtype=np.float32), times


# Runner-name suffixes that change one Pipeline setting, to attribute a speed-up to its parts:
# "torch:nograph" (no CUDA graph), "torch:nograph:torchops" (no graph, torch reference ops),
# "torch:channels_last" / "torch:nchw" (NHWC / NCHW UNet and VAE; the default is NHWC on CUDA),
# "torch:triton" (Triton attention at every shape: the default runs SDPA where it timed faster).
VARIANTS = {
    "nograph": {"cuda_graph": False},
    "torchops": {"kernels": "torch"},
    "triton": {"kernels": "triton"},  # Triton attention everywhere, not SDPA where SDPA timed faster
    "channels_last": {"channels_last": True},
    "nchw": {"channels_last": False},
    "fp32": {"dtype": torch.float32},  # e.g. openvino:bf16 beside the run's --dtype
    "bf16": {"dtype": torch.bfloat16},
}


def split_variant(name: str) -> tuple[str, dict]:
    """'torch:nograph:torchops' -> ('torch', {'cuda_graph': False, 'kernels': 'torch'}); DEFAULT ->
    what Pipeline.from_pretrained(model) gives: backend auto, the dtype fastdiff.precision picks."""
    if name == DEFAULT:
        return "auto", {"dtype": None}
    backend, *suffixes = name.split(":")
    unknown = [s for s in suffixes if s not in VARIANTS]
    if unknown:
        raise ValueError(f"--backends {name!r}: unknown suffix {unknown[0]!r} (known: {', '.join(VARIANTS)})")
    return backend, {k: v for s in suffixes for k, v in VARIANTS[s].items()}


class FastdiffRunner:
    """fastdiff's Pipeline on one backend; stage times from its own synchronised timer."""

    def __init__(self, name: str, folder: Path, args, device: torch.device, dtype: torch.dtype):
        from fastdiff.pipeline import Pipeline

        backend, options = split_variant(name)
        self.name, self.args, self.device = name, args, device
        self.edit = edit_args(args)
        dtype = options.pop("dtype", dtype)
        self.pipe = Pipeline.from_pretrained(folder, backend=backend, device=device, dtype=dtype, **options)
        self.dtype = self.pipe.dtype

    def __call__(self):
        a = self.args
        _sync(self.device)
        t0 = time.perf_counter()
        result = self.pipe.run(
            [a.prompt] * a.batch,
            steps=a.steps,
            guidance_scale=a.guidance_scale,
            height=a.height,
            width=a.width,
            seed=a.seed,
            scheduler=a.scheduler,
            output_type="np",
            timed=True,
            **self.edit,
        )
        _sync(self.device)
        times = {s: float(result.timings[s]) for s in STAGES if s != "end_to_end"}
        times["end_to_end"] = time.perf_counter() - t0
        return np.asarray(result.images, dtype=np.float32), times


def load_runners(folder: Path, args, device, dtype):
    """The reference plus each fastdiff backend; with no --backends, those that cannot run here
    (not built yet, package missing, TensorRT without CUDA) are skipped and listed with why."""
    from fastdiff.backends import BACKENDS, backend_class

    explicit = args.backends is not None
    names = [b.strip() for b in args.backends.split(",") if b.strip()] if explicit else [DEFAULT, *(b for b in BACKENDS if b != "auto")]
    for name in names:
        if name != DEFAULT and split_variant(name)[0] not in BACKENDS:
            raise ValueError(f"--backends: {name!r} is not a fastdiff backend ({', '.join(BACKENDS)})")
    if isolated(args, device):
        make = lambda kind, *spec: Isolated(kind, args.threads, *spec)  # noqa: E731
    else:
        make = lambda kind, *spec: FACTORIES[kind](*spec)  # noqa: E731
    runners, skipped = [make("diffusers", folder, args, device, dtype)], {}
    for name in names:
        backend = split_variant(name)[0]
        types = backend_class(backend).device_types if backend != "auto" else (device.type,)
        if not explicit and device.type not in types:
            skipped[name] = f"runs on {' or '.join(types)}, not {device.type}"
            continue
        if not explicit and args.strength is not None and backend != "auto" and not backend_class(backend).encodes_images:
            skipped[name] = "no VAE encoder (img2img)"
            continue
        try:
            runners.append(make("fastdiff", name, folder, args, device, dtype))
        except (NotImplementedError, ImportError) as e:
            if explicit:
                raise
            skipped[name] = f"{type(e).__name__}: {e}"
    runners += [make("peer", *spec) for spec in peers(folder, args, device, skipped)]
    return runners, skipped


def peers(folder: Path, args, device, skipped: dict) -> list:
    """What to build the OpenVINO peer runners --peers asks for from (OpenVINOPeer's arguments);
    "auto" skips (and lists) what cannot run here."""
    from fastdiff import precision

    if args.peers == "none" or (args.peers == "auto" and device.type != "cpu"):
        return []
    if args.strength is not None:
        if args.peers != "auto":
            raise ValueError("--peers: the OpenVINO peer runs text to image only; use --peers none with --strength")
        skipped[PEER] = "text to image only (no img2img runner)"
        return []
    wanted = args.peers.split(",") if args.peers != "auto" else ["fp32", "bf16"]
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        if args.peers != "auto":
            raise
        skipped[PEER] = f"ImportError: {e}"
        return []
    entry = schedulers.REGISTRY[args.scheduler]
    out = []
    for p in wanted:
        if p == "bf16" and args.peers == "auto" and not precision.cpu_runs_fast(torch.bfloat16):
            skipped[f"{PEER}:bf16"] = "this CPU has no bf16 instructions (fastdiff.precision)"
            continue
        out.append((folder, args, p, entry.diffusers_class, entry.diffusers_config))
    return out


def openvino_peer(*spec):
    return testing.load_script(Path(__file__).with_name("openvino_peer.py")).OpenVINOPeer(*spec)


FACTORIES = {"diffusers": DiffusersRunner, "fastdiff": FastdiffRunner, "peer": openvino_peer}


# ----------------------------------------------------------------------------------------------
# one process per runner


def isolated(args, device: torch.device) -> bool:
    """Whether each runner gets a process of its own: on the CPU unless --same-process."""
    return device.type == "cpu" and not args.same_process


class Isolated:
    """A runner in a process of its own (this script with --worker), driven over its stdin and
    stdout. A CPU torch backend sets glibc's allocator for its whole process
    (`fastdiff.allocator`), and in a shared process that setting moved the other rows' times
    (benchmarks/NOTES-cpu.md); apart, diffusers and the peer run as their own users run them.
    Calls still alternate one runner at a time, so the ratios stay paired by repeat."""

    def __init__(self, kind: str, threads: int | None, *spec):
        """FACTORIES[kind](*spec) in a worker with `threads` torch threads (None: torch's choice)."""
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # stderr: ours
        try:
            self.name, self.dtype, self.cpu_allocator = self.ask((kind, threads, spec))
        except BaseException:
            self.close()
            raise

    def ask(self, message):
        try:
            pickle.dump(message, self.proc.stdin)
            self.proc.stdin.flush()
            ok, value = pickle.load(self.proc.stdout)
        except (EOFError, BrokenPipeError):  # the worker died before or while answering
            raise RuntimeError(self.death()) from None
        if not ok:
            raise value
        return value

    def death(self) -> str:
        """What to say of a worker that ended without answering: its runner, its status and, for
        SIGKILL (what Linux's out-of-memory killer sends: each runner holds its own model), why."""
        status = self.proc.wait()
        who = getattr(self, "name", None) or "a runner being built"
        text = f"the latency.py worker of {who} exited with status {status}"
        if status == -signal.SIGKILL:
            text += " (SIGKILL: out of memory, if Linux's OOM killer sent it; fewer runners in one run need less)"
        return text

    def __call__(self):
        return self.ask("run")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the worker ends at end of input
            self.proc.wait()


def worker() -> int:
    """The far end of Isolated: build one runner, answer each request with one call of it."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else written to stdout goes to stderr, not into the replies
    requests = sys.stdin.buffer

    def reply(ok: bool, value) -> None:
        try:
            data = pickle.dumps((ok, value))
        except Exception:  # an exception that does not pickle: its text
            data = pickle.dumps((False, RuntimeError(f"{type(value).__name__}: {value}")))
        replies.write(data)
        replies.flush()

    kind, threads, spec = pickle.load(requests)
    try:
        if threads:
            torch.set_num_threads(threads)
        runner = FACTORIES[kind](*spec)
    except Exception as e:
        reply(False, e)
        return 1
    reply(True, (runner.name, runner.dtype, cpu_allocator()))
    while True:
        try:
            pickle.load(requests)
        except EOFError:
            return 0
        try:
            reply(True, runner())
        except Exception as e:
            reply(False, e)


def cpu_allocator() -> str:
    """What this process's CPU allocator is: set by a CPU torch backend (fastdiff.allocator) or not."""
    from fastdiff import allocator

    kept = allocator.keep_freed_memory.cache_info().currsize and allocator.keep_freed_memory()
    return "keep freed memory" if kept else "system default"


# ----------------------------------------------------------------------------------------------
# the physical limit


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of CPU flash attention, which FlopCounterMode does not count: QK^T and PV matmuls."""
    b, h, s, d = q_shape
    l, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * s * l * d + 2 * b * h * s * l * dv


def count_unet_flops(folder: Path, args) -> int:
    """FLOPs of one UNet evaluation on the classifier-free-guidance batch, counted on fastdiff's
    UNet built on the meta device: the same ops without weights or compute, so counting costs
    no memory even for SD1.5. The torch reference ops: Triton kernels would be invisible."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff import ops
    from fastdiff.models import UNet2DConditionModel, UNetConfig

    config = UNetConfig.from_json(folder / "unet" / "config.json")
    vae_cfg = testing.read_json(folder / "vae" / "config.json")
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    n = args.batch * (2 if args.guidance_scale > 1.0 else 1)
    cross = config.cross_attention_dim if isinstance(config.cross_attention_dim, int) else config.cross_attention_dim[0]
    with torch.device("meta"):
        unet = UNet2DConditionModel(config)
        x = torch.empty(n, config.in_channels, args.height // scale, args.width // scale)  # [2B, 4, h, w]
        context = torch.empty(n, 77, cross)  # [2B, 77, D]
        t = torch.tensor(500.0)
    custom = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with torch.inference_mode(), ops.kernels("torch"), FlopCounterMode(display=False, custom_mapping=custom) as fc:
        unet(x, t, context)
    return int(fc.get_total_flops())


class MatmulRate:
    """Dense matmul FLOP/s of this device right now, per dtype the runners compute in: a runner's
    UNet step is set against the rate of its own dtype (fp32 and bf16 on a CPU with bf16
    instructions, the run's dtype on GPU), so a bf16 row is not flattered by the fp32 peak."""

    def __init__(self, device: torch.device, dtypes):
        self.device = device
        self.n = 8192 if device.type == "cuda" else 2048
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(self.n, self.n, generator=g), torch.randn(self.n, self.n, generator=g)
        self.operands = {dt: (a.to(device, dt), b.to(device, dt)) for dt in dict.fromkeys(dtypes)}
        self.samples: dict[torch.dtype, list[float]] = {dt: [] for dt in self.operands}
        self.sample(record=False)  # warm-up

    def sample(self, record: bool = True) -> None:
        for dt, (a, b) in self.operands.items():
            _sync(self.device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(self.device)
            if record:
                self.samples[dt].append(2 * self.n**3 / (time.perf_counter() - t0))

    def peak(self, dtype: torch.dtype) -> float:
        return statistics.median(self.samples[dtype])


# ----------------------------------------------------------------------------------------------
# measurement and summary


class _Progress:
    """tqdm when installed, else one rewritten stderr line."""

    def __init__(self, total: int, disable: bool):
        self.total, self.done, self.disable, self.bar = total, 0, disable, None
        if not disable:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="benchmark", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self, what: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(1)
        elif not self.disable:
            print(f"\r[{self.done}/{self.total}] {what:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif not self.disable:
            print(file=sys.stderr)


def measure(runners, args, rate: MatmulRate):
    """Warm-up then timed rounds, each round every runner once in order; one matmul-rate sample
    per round too (at least 5 in all), so the peak is measured under the same load. Also each
    runner's first call in seconds (compilation, tuning, graph capture), printed as it ends: a
    run cut short by a time limit still says how far it got."""
    times = {r.name: {s: [] for s in STAGES} for r in runners}
    images, first_call = {}, {}
    per_round = max(1, math.ceil(5 / args.repeats))
    progress = _Progress((args.warmup + args.repeats) * len(runners), args.quiet)
    try:
        for i in range(args.warmup + args.repeats):
            warm = i < args.warmup
            for r in runners:
                t0 = time.perf_counter()
                img, t = r()
                if i == 0:
                    first_call[r.name] = time.perf_counter() - t0
                    print(f"first call of {r.name}: {first_call[r.name]:.1f} s", file=sys.stderr, flush=True)
                progress.update(f"{'warm-up' if warm else 'repeat'} {i - args.warmup + 1 if not warm else i + 1} {r.name}")
                if not warm:
                    for s in STAGES:
                        times[r.name][s].append(t[s])
                    images[r.name] = img
            if not warm:
                for _ in range(per_round):
                    rate.sample()
    finally:
        progress.close()
    return times, images, first_call


def attention_choices() -> list[str]:
    """What fastdiff's "auto" kernel mode chose per attention shape in this process (Triton or
    torch's SDPA, timed at the shape's first call on CUDA), with both times; empty on CPU."""
    from fastdiff import ops

    lines = []
    for key, (choice, times) in ops.ATTENTION_CHOICE.items():
        q_shape, k_shape, dtype = key[0], key[1], key[5]
        timing = ", ".join(f"{name} {ms * 1000:.1f} us" for name, ms in times.items())
        lines.append(f"q {list(q_shape)} k {list(k_shape)} {dtype_name(dtype)}: {choice} ({timing})")
    return lines


def _spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def parity(ref: np.ndarray, got: np.ndarray) -> dict:
    """Max abs difference and PSNR (peak 1.0) of images in [0, 1]."""
    if ref.shape != got.shape:
        raise ValueError(f"image shapes differ: reference {ref.shape}, backend {got.shape}")
    d = got.astype(np.float64) - ref.astype(np.float64)
    mse = float(np.mean(d * d))
    psnr = PSNR_CAP_DB if mse <= 10 ** (-PSNR_CAP_DB / 10) else 10 * math.log10(1.0 / mse)
    return {"max_abs": float(np.max(np.abs(d))), "mean_abs": float(np.mean(np.abs(d))), "psnr_db": psnr}


def summarize(times, images, flops: int, rate: MatmulRate, dtypes: dict) -> dict:
    """`dtypes`: each runner's network dtype, whose matmul rate its UNet step is set against."""
    runs = {name: {s: _spread(v) for s, v in stages.items()} for name, stages in times.items()}
    speedup, par, achieved = {}, {}, {}
    for name, stages in times.items():
        step, dtype = runs[name]["unet_step"]["median"], dtypes[name]
        achieved[name] = {
            "flops_per_s": flops / step,
            "dtype": dtype_name(dtype),
            "fraction_of_peak": flops / step / rate.peak(dtype),
        }
        if name == REF:
            continue
        # Pair by pair: repeat r of the backend against repeat r of the reference.
        speedup[name] = {s: _spread([a / b for a, b in zip(times[REF][s], stages[s])]) for s in STAGES}
        par[name] = parity(images[REF], images[name])
    # Each fastdiff runner against each peer, end to end and per UNet step, paired by repeat.
    vs_peer = {
        peer: {
            name: {s: _spread([a / b for a, b in zip(times[peer][s], times[name][s])]) for s in ("unet_step", "end_to_end")}
            for name in times if name != REF and not name.startswith(PEER)
        }
        for peer in times if peer.startswith(PEER)
    }
    return {
        "runs": runs,
        "speedup": speedup,
        "vs_peer": vs_peer,
        "parity": par,
        "flops": {
            "unet_flops_per_step": flops,
            "matmul": {"n": rate.n, "samples": {dtype_name(dt): v for dt, v in rate.samples.items()}},
            "peak_flops_per_s": {dtype_name(dt): rate.peak(dt) for dt in rate.samples},
            "achieved": achieved,
        },
    }


# ----------------------------------------------------------------------------------------------
# output


def _fmt_time(med: float, lo: float, hi: float) -> str:
    scale, unit = (1.0, "s") if med >= 1.0 else (1e3, "ms")
    v = med * scale
    nd = 2 if v < 10 else 1 if v < 100 else 0
    return f"{med * scale:.{nd}f} [{lo * scale:.{nd}f}-{hi * scale:.{nd}f}] {unit}"


def allocators(res: dict) -> str:
    """Each runner's CPU allocator, said once when they share one."""
    by_runner = res["environment"]["cpu_allocator"]
    if isinstance(by_runner, str):  # results written before runners had processes of their own
        return by_runner
    if len(set(by_runner.values())) == 1:
        return f"{next(iter(by_runner.values()))} for every runner"
    return ", ".join(f"{v} ({k})" for k, v in by_runner.items())


def format_table(res: dict) -> str:
    s, names = res["settings"], list(res["runs"])
    backends = [n for n in names if n != REF]
    lines = [
        f"model: {res['model']['description']}",
        f"{s['height']}x{s['width']}, {s['steps']} steps {s['scheduler']}"
        f"{'' if s.get('strength') is None else ' img2img at strength %g' % s['strength']}, batch {s['batch']}, guidance "
        f"{s['guidance_scale']}, {res['environment']['device']} {s['dtype']}, "
        f"{res['environment']['torch_threads']} threads ({res['environment']['gpu'] or res['environment']['cpu']}), "
        f"{s['repeats']} repeats interleaved after {s['warmup']} warm-up"
        + (f", CPU allocator: {allocators(res)}" if "cpu_allocator" in res["environment"] else ""),
        "",
    ]
    w0, wt, wr = 16, 27, 22
    head = f"{'stage':<{w0}}" + f"{REF + ' (ref)':>{wt}}"
    sub = f"{'':<{w0}}" + f"{'median [min-max]':>{wt}}"
    for b in backends:
        head += f"{b:>{wt}}{'':>{wr}}"
        sub += f"{'median [min-max]':>{wt}}{'speed-up [min-max]':>{wr}}"
    lines += [head, sub]
    for st in STAGES:
        r = res["runs"][REF][st]
        row = f"{LABELS[st]:<{w0}}{_fmt_time(r['median'], r['min'], r['max']):>{wt}}"
        for b in backends:
            t, q = res["runs"][b][st], res["speedup"][b][st]
            row += f"{_fmt_time(t['median'], t['min'], t['max']):>{wt}}"
            row += f"{q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}]".rjust(wr)
        lines.append(row)
    lines.append("")
    for b in backends:
        p = res["parity"][b]
        psnr = "identical" if p["psnr_db"] >= PSNR_CAP_DB else f"PSNR {p['psnr_db']:.1f} dB"
        lines.append(f"parity {b} vs {REF}: max |diff| {p['max_abs']:.2e}, mean |diff| {p['mean_abs']:.2e}, {psnr}")
    for peer, rows in res.get("vs_peer", {}).items():
        ratios = ", ".join(
            f"{name} {r['end_to_end']['median']:.2f}x [{r['end_to_end']['min']:.2f}-{r['end_to_end']['max']:.2f}] "
            f"(UNet step {r['unet_step']['median']:.2f}x)"
            for name, r in rows.items()
        )
        lines.append(f"speed-up vs {peer}, end to end: {ratios}")
    f = res["flops"]
    rates = ", ".join(
        f"{dt} {peak / 1e9:.4g} GFLOP/s (median of {len(f['matmul']['samples'][dt])})" for dt, peak in f["peak_flops_per_s"].items()
    )
    lines.append(f"UNet: {f['unet_flops_per_step'] / 1e9:.3g} GFLOP per step; dense matmul {f['matmul']['n']}^2: {rates}")
    for name in names:
        a = f["achieved"][name]
        lines.append(
            f"  {name:<20} UNet step {a['flops_per_s'] / 1e9:8.4g} GFLOP/s = {100 * a['fraction_of_peak']:5.1f}% of {a['dtype']} matmul peak"
        )
    for name, why in res["skipped"].items():
        lines.append(f"skipped backend {name}: {why}")
    env = res["environment"]
    loads = [x for x in (env["load_avg_1min"], res["load_avg_1min_after"]) if x is not None]
    if env["device"].startswith("cpu") and loads and max(loads) > (env["cpu_count"] or 1):
        hint = "; try --threads 1" if env["torch_threads"] > 1 else ""
        lines.append(
            f"WARNING: load average {max(loads):.1f} on {env['cpu_count']} cores: other processes share the "
            f"CPU, absolute times are unreliable (paired ratios less so){hint}"
        )
    return "\n".join(lines)


def write_report(folder: Path, res: dict, images: dict, table: str) -> None:
    """report.md plus, per backend, one PNG: reference | backend | abs difference scaled to its max."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)

    def to_u8(x):  # [N, H, W, C] in [0, 1] -> [N*H, W, C] uint8, images stacked vertically
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8).reshape(-1, *x.shape[2:])

    ref = images[REF]
    upscale = max(1, 256 // ref.shape[1])  # tiny models: 64 px is too small to look at
    md = ["# fastdiff latency benchmark", "", "```", table, "```", ""]
    Image.fromarray(to_u8(ref)).save(folder / "reference.png")
    for name, img in images.items():
        if name == REF:
            continue
        diff = np.abs(img.astype(np.float64) - ref).max(axis=-1, keepdims=True)  # [N, H, W, 1]
        peak = float(diff.max())
        amp = 1.0 / peak if peak > 0 else 1.0
        diff_rgb = np.repeat(np.clip(diff * amp, 0, 1), 3, axis=-1)
        gap = np.ones((ref.shape[0], ref.shape[1], 2, 3), np.float32)
        row = np.concatenate([ref, gap, img, gap, diff_rgb], axis=2)  # [N, H, 3W + 4, 3]
        pic = Image.fromarray(to_u8(row))
        pic = pic.resize((pic.width * upscale, pic.height * upscale), Image.NEAREST)
        pic.save(folder / f"{name}_vs_{REF}.png")
        Image.fromarray(to_u8(img)).save(folder / f"{name}.png")
        md += [
            f"## {name}",
            "",
            f"Left: {REF} (reference); middle: fastdiff {name}; right: |difference| (max over RGB) "
            f"amplified x{amp:.3g}, white = {peak:.2e}.",
            "",
            f"![{name} vs {REF}]({name}_vs_{REF}.png)",
            "",
        ]
    md += ["## Settings and environment", "", "```json",
           json.dumps({k: res[k] for k in ("settings", "model", "environment")}, indent=2), "```", ""]
    (folder / "report.md").write_text("\n".join(md))


# ----------------------------------------------------------------------------------------------
# gate


def load_gate(path: Path) -> dict:
    """Read and check a gate file before the (slow) run, so a typo fails at once.

    Format: {"_comment": "...", "<device type>": {"min_speedup": {backend: {stage: ratio}},
    "max_abs": {backend: x}, "min_psnr_db": {backend: dB}}}; keys starting with "_" are notes.
    """
    gate = json.loads(Path(path).read_text())
    for dev, section in gate.items():
        if dev.startswith("_"):
            continue
        if dev not in ("cpu", "cuda") or not isinstance(section, dict):
            raise ValueError(f"gate {path}: {dev!r} must be a device type (cpu, cuda) holding thresholds")
        for key, per_backend in section.items():
            if key.startswith("_"):
                continue
            if key not in GATE_KEYS:
                raise ValueError(f"gate {path}: {dev}.{key}: allowed keys are {', '.join(GATE_KEYS)}")
            for backend, value in per_backend.items():
                if key == "min_speedup":
                    bad = [s for s in value if s not in STAGES]
                    if bad:
                        raise ValueError(f"gate {path}: {dev}.{key}.{backend}: unknown stages {bad}; stages are {STAGES}")
                elif not isinstance(value, (int, float)):
                    raise ValueError(f"gate {path}: {dev}.{key}.{backend} must be a number")
    return gate


def check_gate(res: dict, gate: dict) -> list[str]:
    """Every threshold missed, one line each (empty: gate passed). Ratios and parity only."""
    dev = torch.device(res["settings"]["device"]).type
    section = gate.get(dev)
    if not section:
        return [f"gate has no thresholds for device type {dev!r}"]
    missed = []

    def measured(backend: str, what: str) -> bool:
        if backend in res["runs"]:
            return True
        why = res["skipped"].get(backend, "not in --backends")
        missed.append(f"{what} {backend}: backend not measured ({why})")
        return False

    for backend, stages in section.get("min_speedup", {}).items():
        if measured(backend, "min_speedup"):
            for stage, lo in stages.items():
                got = res["speedup"][backend][stage]["median"]
                if got < lo:
                    missed.append(f"min_speedup {backend} {stage}: {got:.2f}x < {lo}x")
    for backend, hi in section.get("max_abs", {}).items():
        if measured(backend, "max_abs"):
            got = res["parity"][backend]["max_abs"]
            if not got <= hi:
                missed.append(f"max_abs {backend}: {got:.3g} > {hi}")
    for backend, lo in section.get("min_psnr_db", {}).items():
        if measured(backend, "min_psnr_db"):
            got = res["parity"][backend]["psnr_db"]
            if not got >= lo:
                missed.append(f"min_psnr_db {backend}: {got:.1f} dB < {lo} dB")
    return missed


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    if (sys.argv[1:] if argv is None else argv) == ["--worker"]:
        return worker()
    args = parse_args(argv)
    try:
        gate = load_gate(args.gate) if args.gate else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, gate)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests): leave it as found


def _run(args, gate) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    env = testing.environment(device)  # before the runs: the load average they start under
    if device.type == "cpu" and args.same_process:
        from fastdiff import allocator

        # Process-wide: set before any runner loads, so every row (diffusers and the peer too)
        # runs on the same allocator, not only those after fastdiff's first CPU backend.
        allocator.keep_freed_memory()
    runners = []
    try:
        with tempfile.TemporaryDirectory(prefix="fastdiff-bench-") as tmp:
            folder, description = resolve_folder(args, Path(tmp))
            kept = not folder.is_relative_to(tmp)
            args.height, args.width = image_size(folder, args.height, args.width)
            runners, skipped = load_runners(folder, args, device, dtype)
            if device.type == "cpu":
                env["cpu_allocator"] = {r.name: getattr(r, "cpu_allocator", None) or cpu_allocator() for r in runners}
            flops = count_unet_flops(folder, args)
            dtypes = {r.name: r.dtype for r in runners}
            rate = MatmulRate(device, dtypes.values())  # the reference runner is in the run's dtype
            times, images, first_call = measure(runners, args, rate)
    finally:
        for r in runners:
            if isinstance(r, Isolated):
                r.close()
        del runners

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(device=str(device), dtype=dtype_name(dtype))
    res = {
        "schema": 2,  # 2: matmul rates per dtype
        "settings": settings,
        "model": {"description": description, "folder": str(folder) if kept else None},
        "environment": env,
        "stages": list(STAGES),
        "skipped": skipped,
        "load_avg_1min_after": testing.load_avg(),
        "first_call_s": first_call,
        "attention_choice": attention_choices(),
        **summarize(times, images, flops, rate, dtypes),
    }
    table = format_table(res)
    print(table)
    for line in res["attention_choice"]:
        print(f"auto attention: {line}")
    status = 0
    if gate is not None:
        missed = check_gate(res, gate)
        res["gate"] = {"file": str(args.gate), "missed": missed}
        if missed:
            status = 1
            print(f"\nGATE FAILED ({args.gate}): {len(missed)} threshold(s) missed:")
            for m in missed:
                print(f"  {m}")
        else:
            print(f"\ngate passed ({args.gate})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if args.report:
        write_report(args.report, res, images, table)
    return status


if __name__ == "__main__":
    sys.exit(main())
