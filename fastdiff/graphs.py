"""One CUDA graph for a whole denoising step: UNet on the CFG batch, guidance, scheduler update;
and one each for the text encoder and VAE decode calls.

Launch overhead dominates SD1.5's UNet at fp16 on a big GPU (hundreds of small kernels per step),
so the step is captured once per (shapes, scheduler, steps, CFG) and replayed for every step.
The step index is a device tensor that the graph itself increments, so the same graph serves
step 0 and step N-1: the scheduler indexes its precomputed coefficient tables with it. img2img
replays the same kind of graph on a truncated schedule (its start is part of the key); inpainting
adds its mask inputs or its blend (fastdiff.editing.Inpainting) to the captured step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


def capture(body, device: torch.device, before=lambda: None):
    """Run `body` twice on a side stream (autotuning, library handles, allocator warm-up), then
    record it in a CUDA graph; `before` runs ahead of each warm-up and of the capture, outside
    the graph. Returns (graph, what `body` returned while being captured)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            before()
            body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before()
    with torch.cuda.graph(graph):
        out = body()
    return graph, out


@dataclass(frozen=True)
class GraphKey:
    """Everything the captured graph depends on; any change means a new capture."""

    shape: tuple  # latents [N, 4, h, w]
    context_shape: tuple  # [(2)N, 77, D]
    scheduler: str
    karras: bool
    steps: int
    start: int  # first step run (img2img's strength < 1): the tables the graph reads are truncated there
    inpaint: str  # "" | "concat" (9-channel UNet) | "blend" (4-channel): fastdiff.editing.Inpainting.kind
    cfg: bool
    dtype: torch.dtype
    kernels: str  # ops mode in force at capture ("torch" / "triton" / "auto"): which ops were recorded


class GraphedStep:
    """Static buffers + the captured step. Not thread-safe by itself: callers hold `lock`.

    Off CUDA nothing is captured and `run` calls the body eagerly on the same static buffers and
    device-tensor step index, so CPU tests check everything but the capture itself."""

    def __init__(self, key: GraphKey, sched, unet, device: torch.device, inpaint=None):
        self.key, self.sched, self.unet = key, sched, unet
        self.lock = threading.Lock()
        n_evals = len(sched.timesteps)
        self.latents = torch.zeros(key.shape, device=device, dtype=torch.float32)
        self.context = torch.zeros(key.context_shape, device=device, dtype=key.dtype)
        self.guidance = torch.zeros((key.shape[0], 1, 1, 1), device=device, dtype=torch.float32)  # per sample
        self.index = torch.zeros((), device=device, dtype=torch.int64)
        self.noise = (
            torch.zeros((n_evals, *key.shape), device=device, dtype=torch.float32) if sched.needs_noise else None
        )
        self.inpaint = None  # static copies of the call's inpainting tensors
        if inpaint is not None:
            from fastdiff.editing import Inpainting

            self.inpaint = Inpainting(**{k: torch.zeros(v.shape, device=device, dtype=v.dtype) for k, v in inpaint.tensors().items()})
        self.state = sched.init_state(self.latents)
        self._state0 = {k: v.clone() for k, v in self.state.items()}

        self.graph = None
        if device.type == "cuda":  # elsewhere the same body runs eagerly (how CPU tests check it)
            self.graph, _ = capture(self._step, device, before=self._reset)

    def _reset(self) -> None:
        self.index.zero_()
        for k, v in self.state.items():
            v.copy_(self._state0[k])

    def _step(self) -> None:
        """The captured body: every tensor it touches is a static buffer or a scheduler table."""
        i, lat = self.index, self.latents
        x = torch.cat([lat, lat]) if self.key.cfg else lat  # [(2)N, 4, h, w]
        x = self.sched.scale_model_input(x, i)
        if self.inpaint is not None:
            x = self.inpaint.unet_input(x)  # [(2)N, 9, h, w] for an inpainting UNet
        eps = self.unet(x, self.sched.timestep(i), self.context).float()
        if self.key.cfg:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + self.guidance * (eps_text - eps_uncond)
        noise = None if self.noise is None else self.noise.index_select(0, i.reshape(1))[0]
        out = self.sched.step(eps, i, lat, self.state, noise=noise)
        if self.inpaint is not None:
            out = self.inpaint.blend(self.sched, out, i)
        lat.copy_(out)
        i.add_(1)

    def run(self, latents, context, guidance_scale: float | torch.Tensor, noise, inpaint=None) -> torch.Tensor:
        """Denoise `latents` fully by replaying the graph once per evaluation; returns a copy.
        guidance_scale: one number, or one per sample ([N, 1, 1, 1], a batch of requests)."""
        if self.inpaint is not None:
            for k, v in inpaint.tensors().items():
                getattr(self.inpaint, k).copy_(v)
        self.latents.copy_(latents)
        self.context.copy_(context)
        self.guidance.copy_(torch.as_tensor(guidance_scale, dtype=torch.float32).reshape(-1, 1, 1, 1).expand_as(self.guidance))
        if self.noise is not None:
            self.noise.copy_(noise)
        self._reset()
        for _ in range(len(self.sched.timesteps)):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        return self.latents.clone()


class GraphedCall:
    """One network call (text encoder, VAE decode) captured for one input shape: a static input
    buffer, the captured call, and its output copied out after each replay. Those calls are
    hundreds of small launches, once per image; capture removes their launch gaps. Off CUDA the
    call runs eagerly on the static input (how CPU tests check it). Callers hold `lock`."""

    def __init__(self, fn, example: torch.Tensor):
        self.fn = fn
        self.lock = threading.Lock()
        self.input = example.clone(memory_format=torch.contiguous_format)
        self.graph = None
        if example.device.type == "cuda":
            self.graph, self.output = capture(lambda: fn(self.input), example.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        if self.graph is None:
            return self.fn(self.input)
        self.graph.replay()
        return self.output.clone()
