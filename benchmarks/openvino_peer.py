"""The OpenVINO peer for benchmarks/latency.py: what a CPU user runs instead of fastdiff.

optimum-intel's OVStableDiffusionPipeline is that peer, but its newest release (1.15.0) does not
import with OpenVINO 2026.4 (it reads `openvino.runtime`, which OpenVINO removed). So this is the
same recipe done here: diffusers' own text encoder, UNet and VAE decoder converted by
`openvino.convert_model`, compiled by the CPU plugin at f32 or bf16, and a plain denoising loop
with diffusers' tokenizer and scheduler (classifier-free guidance as a batch of 2, latents drawn
as diffusers draws them), so its images match diffusers' at f32.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HINTS = {"fp32": "f32", "bf16": "bf16"}


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]  # [B, 77, D]


class UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class OpenVINOPeer:
    """A latency.py runner: call() -> (images [N, H, W, 3] float32 in [0, 1], {stage: seconds})."""

    def __init__(self, folder: Path, args, precision: str, scheduler_class: str, scheduler_config: dict):
        import diffusers
        import openvino as ov

        self.name, self.args = f"openvino-peer:{precision}", args
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]  # what its matmuls run in
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        self.tokenizer = pipe.tokenizer
        self.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config, **scheduler_config)
        self.scaling_factor = pipe.vae.config.scaling_factor
        self.latent_channels = pipe.unet.config.in_channels
        self.vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        d = pipe.text_encoder.config.hidden_size
        h, w = args.height // self.vae_scale, args.width // self.vae_scale  # traced at the run's size
        examples = {
            "text_encoder": (TextEncoder(pipe.text_encoder), (torch.zeros(2, 77, dtype=torch.int64),)),
            "unet": (UNet(pipe.unet), (torch.randn(2, self.latent_channels, h, w), torch.tensor(999.0), torch.randn(2, 77, d))),
            "vae_decoder": (VaeDecoder(pipe.vae), (torch.randn(1, pipe.vae.config.latent_channels, h, w),)),
        }
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),  # as many as the torch runners use
        }
        # diffusers passes the generator to step() where the scheduler takes one (ancestral noise)
        self.step_kwargs = "generator" in inspect.signature(self.scheduler.step).parameters
        core = ov.Core()
        self.compiled = {}
        for name, (module, example) in examples.items():
            with torch.no_grad():
                model = ov.convert_model(module.eval(), example_input=example)
            self.compiled[name] = core.compile_model(model, "CPU", config)

    def _run(self, name: str, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.compiled[name]([x.numpy() for x in inputs])[0]
        return torch.from_numpy(np.array(out))  # a copy: the compiled model reuses its buffers

    def _ids(self, prompts: list[str]) -> torch.Tensor:
        t = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")  # fmt: skip
        return t.input_ids  # [B, 77]

    def __call__(self):
        a = self.args
        prompts = [a.prompt] * a.batch
        cfg = a.guidance_scale > 1.0
        t0 = time.perf_counter()
        ids = torch.cat([self._ids([""] * len(prompts)), self._ids(prompts)]) if cfg else self._ids(prompts)
        context = self._run("text_encoder", ids)  # [(2)B, 77, D]: negative first, as diffusers
        t1 = time.perf_counter()
        generator = torch.Generator("cpu").manual_seed(a.seed)
        shape = (len(prompts), self.latent_channels, a.height // self.vae_scale, a.width // self.vae_scale)
        self.scheduler.set_timesteps(a.steps)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32) * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            eps = self._run("unet", x, torch.as_tensor(t, dtype=torch.float32), context)
            if cfg:
                uncond, text = eps.chunk(2)
                eps = uncond + a.guidance_scale * (text - uncond)
            extra = {"generator": generator} if self.step_kwargs else {}
            latents = self.scheduler.step(eps, t, latents, return_dict=False, **extra)[0]
        t2 = time.perf_counter()
        image = self._run("vae_decoder", latents / self.scaling_factor)  # [B, 3, H, W] in about [-1, 1]
        images = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)  # [B, H, W, 3]
        t3 = time.perf_counter()
        times = {"text_encoder": t1 - t0, "denoise": t2 - t1, "unet_step": (t2 - t1) / a.steps,
                 "vae_decode": t3 - t2, "end_to_end": t3 - t0}  # fmt: skip
        return images, times
