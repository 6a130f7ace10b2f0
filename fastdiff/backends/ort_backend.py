"""The onnxruntime backend: runs an export made by `python -m fastdiff.export`.

CPU: the CPU execution provider, numpy in and out. CUDA: the CUDA execution provider with IO
binding, so inputs and outputs stay torch tensors on the GPU (no host round trip). Input and
output names, dtypes and shapes come from `fastdiff.iospec`; every call returns torch tensors on
the pipeline's device, in the export's precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import logging

from fastdiff import iospec
from fastdiff.backends.base import Backend
from fastdiff.export.cache import read_manifest
from fastdiff.weights import read_configs

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32}


def cuda_provider_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


log = logging.getLogger("fastdiff")


def precision(dtype: torch.dtype) -> str:
    precisions = {torch.float32: "fp32", torch.float16: "fp16"}
    if dtype not in precisions:
        raise ValueError(f"dtype={dtype}: ONNX exports are float32 or float16")
    return precisions[dtype]


def cached_or_new_export(root: Path, dtype: torch.dtype, *, attention: str, adapters: dict | None = None) -> Path:
    """The cached dynamic export of `root` for `dtype` (with `adapters` merged); made (and
    logged) when missing."""
    from fastdiff.export.cache import find_export

    found = find_export(root, precision(dtype), attention=attention, adapters=adapters)
    if found is not None:
        return found
    from fastdiff.export.onnx_export import export

    log.info("fastdiff: no %s ONNX export of %s%s in the cache: exporting (once; takes minutes for SD1.5)",
             precision(dtype), root, " with these LoRA adapters" if adapters else "")  # fmt: skip
    return export(root, precision=precision(dtype), attention=attention, adapters=adapters)


class OnnxRuntimeBackend(Backend):
    """The four exported networks on onnxruntime sessions, from an export of the model."""

    name = "onnxruntime"
    dtypes = (torch.float32, torch.float16)
    encodes_images = True

    @classmethod
    def auto_cost(cls, device: torch.device) -> float | None:
        return None  # never auto's choice: its exported UNet takes latent sides in multiples of 2 ** (down blocks - 1)

    @classmethod
    def create(cls, root, *, device, dtype, kernels=None, channels_last=False, adapters=None) -> "OnnxRuntimeBackend":
        return cls(cached_or_new_export(root, dtype, attention="mha", adapters=adapters), device=device, dtype=dtype)

    def __init__(self, export_dir: Path, *, device: torch.device, dtype: torch.dtype, session_options=None):
        import onnxruntime as ort

        self.export_dir, self.device = Path(export_dir), torch.device(device)
        manifest = read_manifest(self.export_dir) or {}
        self.precision = manifest.get("options", {}).get("precision", "fp32")
        self.dtype = iospec.PRECISIONS[self.precision]
        if dtype != self.dtype:
            raise ValueError(f"{export_dir} is a {self.precision} export; the pipeline asked for {dtype}")
        self.latent_multiple = manifest.get("latent_multiple") or 1
        static = (manifest.get("options") or {}).get("static")
        self.static_size = (static["height"], static["width"]) if static else None
        self.configs = read_configs(self.export_dir, exported=True)
        if self.device.type == "cuda":
            if not cuda_provider_available():
                raise RuntimeError("onnxruntime on CUDA needs the onnxruntime-gpu package (CUDAExecutionProvider)")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.sessions = {
            name: ort.InferenceSession(str(self.export_dir / name / "model.onnx"), session_options, providers=providers)
            for name in iospec.NETWORKS
        }
        self.name = "onnxruntime" if self.device.type == "cpu" else "onnxruntime-cuda"

    # ------------------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", {"input_ids": input_ids})[0]

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = sample.shape[-2:]
        m = self.latent_multiple
        if m and (h % m or w % m):
            f = iospec.vae_scale_factor(self.configs["vae"])
            raise ValueError(
                f"this ONNX UNet takes latent sides that are multiples of {m} (images: multiples of {m * f} px); "
                f"got {h}x{w} latents ({h * f}x{w * f} px). Use backend='torch' for other sizes."
            )
        t = torch.as_tensor(timestep).reshape(1)  # [1]: one timestep shared by the batch
        return self._run("unet", {"sample": sample, "timestep": t, "encoder_hidden_states": context})[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", {"latent_sample": latents})[0]

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ValueError unless the sides are multiples of the VAE's scale factor (the graph would floor them)
        iospec.dims(self.configs, image.shape[0], image.shape[-2], image.shape[-1])
        return iospec.latent_gaussian(self._run("vae_encoder", {"sample": image})[0])

    # ------------------------------------------------------------------------------------------
    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        net = iospec.NETWORKS[name]
        dtypes = {t.name: t.torch_dtype(self.precision) for t in net.tensors}
        session = self.sessions[name]
        if self.device.type != "cuda":
            feed = {k: v.detach().to("cpu", dtypes[k]).contiguous().numpy() for k, v in inputs.items()}
            return [torch.from_numpy(o) for o in session.run([t.name for t in net.outputs], feed)]

        # CUDA: bind torch's device memory directly; outputs preallocated from iospec's shapes.
        index = self.device.index or 0
        feed = {k: v.detach().to(self.device, dtypes[k]).contiguous() for k, v in inputs.items()}
        shapes = net.shapes(self._dims(name, feed))
        outs = [torch.empty(shapes[t.name], dtype=dtypes[t.name], device=self.device) for t in net.outputs]
        binding = session.io_binding()
        for k, v in feed.items():
            binding.bind_input(k, "cuda", index, _NP[v.dtype], tuple(v.shape), v.data_ptr())
        for t, o in zip(net.outputs, outs):
            binding.bind_output(t.name, "cuda", index, _NP[o.dtype], tuple(o.shape), o.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime runs on its own stream
        session.run_with_iobinding(binding)  # returns once its stream is done
        return outs

    def _dims(self, name: str, feed: dict[str, torch.Tensor]) -> dict[str, int]:
        """iospec axis sizes for the inputs given (batch from dim 0, image size from the latents,
        or from the image itself for the VAE encoder)."""
        f = iospec.vae_scale_factor(self.configs["vae"])
        first = next(iter(feed.values()))
        if name == "text_encoder":
            return iospec.dims(self.configs, first.shape[0], f, f)  # image size unused
        h, w = first.shape[-2:]
        if name == "vae_encoder":
            return iospec.dims(self.configs, first.shape[0], h, w)
        return iospec.dims(self.configs, first.shape[0], h * f, w * f)
