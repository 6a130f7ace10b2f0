"""The OpenVINO backend: the CPU plugin runs the same cached ONNX export as onnxruntime.

OpenVINO reads the export directly (its ONNX frontend turns the com.microsoft MultiHeadAttention
nodes into its fused ScaledDotProductAttention), so there is one export per model and one cache
with one set of rules (content-hash key, manifest, atomic writes: fastdiff.export.cache). The
precision is a compile option on the float32 graph: bf16 (INFERENCE_PRECISION_HINT) where the CPU
runs it natively, which fastdiff.precision decides; inputs and outputs stay float32.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from fastdiff import iospec
from fastdiff.backends.base import Backend
from fastdiff.backends.ort_backend import cached_or_new_export
from fastdiff.export.cache import read_manifest
from fastdiff.weights import read_configs

log = logging.getLogger("fastdiff")

HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}  # INFERENCE_PRECISION_HINT per network dtype


class OpenVINOBackend(Backend):
    """The four exported networks compiled by OpenVINO's CPU plugin from the model's ONNX export."""

    name = "openvino"
    device_types = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16)
    encodes_images = True

    @classmethod
    def auto_cost(cls, device: torch.device) -> float | None:
        return None  # never auto's choice: it runs the export, whose UNet narrows latent sizes

    @classmethod
    def create(cls, root, *, device, dtype, kernels=None, channels_last=False, adapters=None) -> "OpenVINOBackend":
        check_device(device, dtype)
        return cls(cached_or_new_export(root, torch.float32, attention="mha", adapters=adapters), device=device, dtype=dtype)

    def __init__(self, export_dir: Path, *, device: torch.device, dtype: torch.dtype, threads: int | None = None):
        import openvino as ov

        check_device(device, dtype)
        self.export_dir, self.device, self.dtype = Path(export_dir), torch.device(device), dtype
        manifest = read_manifest(self.export_dir) or {}
        if (manifest.get("options") or {}).get("precision", "fp32") != "fp32":
            raise ValueError(f"{export_dir}: the openvino backend compiles float32 exports (bf16 is a compile option)")
        self.latent_multiple = manifest.get("latent_multiple") or 1
        static = (manifest.get("options") or {}).get("static")
        self.static_size = (static["height"], static["width"]) if static else None
        self.configs = read_configs(self.export_dir, exported=True)
        config = {
            "INFERENCE_PRECISION_HINT": HINTS[dtype],
            "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),  # as many as torch uses
        }
        core = ov.Core()
        self.compiled = {
            name: core.compile_model(str(self.export_dir / name / "model.onnx"), "CPU", config) for name in iospec.NETWORKS
        }
        self._local = threading.local()  # an infer request per thread and network: they are not thread-safe

    # ------------------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run("text_encoder", {"input_ids": input_ids})

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep).reshape(1)  # [1]: one timestep shared by the batch
        return self._run("unet", {"sample": sample, "timestep": t, "encoder_hidden_states": context})

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run("vae_decoder", {"latent_sample": latents})

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ValueError unless the sides are multiples of the VAE's scale factor (the graph would floor them)
        iospec.dims(self.configs, image.shape[0], image.shape[-2], image.shape[-1])
        return iospec.latent_gaussian(self._run("vae_encoder", {"sample": image}))

    # ------------------------------------------------------------------------------------------
    def _run(self, name: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's first output as a float32 CPU tensor (its own copy)."""
        net = iospec.NETWORKS[name]
        dtypes = {t.name: t.torch_dtype("fp32") for t in net.tensors}
        feed = {k: v.detach().to("cpu", dtypes[k]).contiguous().numpy() for k, v in inputs.items()}
        if not hasattr(self._local, "requests"):
            self._local.requests = {}
        if name not in self._local.requests:
            self._local.requests[name] = self.compiled[name].create_infer_request()
        requests = self._local.requests
        result = requests[name].infer(feed)
        return torch.from_numpy(result[self.compiled[name].output(0)].copy())  # the request reuses its buffers


def check_device(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError unless the device is the CPU and the dtype one this backend compiles."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"backend='openvino' runs on the CPU; got device={str(device)!r}")
    if dtype not in HINTS:
        raise ValueError(f"dtype={dtype}: backend='openvino' runs torch.float32 or torch.bfloat16")
