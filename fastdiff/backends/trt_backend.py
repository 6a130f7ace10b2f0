"""The TensorRT backend: fp16 engines built by `python -m fastdiff.export MODEL --engine tensorrt`.

Each network gets one execution context and static device buffers sized for its profile's
largest shape; a call copies its inputs into those buffers, runs the engine on torch's current
stream and returns a copy of the output (torch tensors on the pipeline's device). Where the
profile is static the UNet call is captured once in a CUDA graph and replayed, which removes the
per-layer launch overhead from the denoising loop. One lock serialises calls: contexts and
buffers are shared.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from fastdiff import iospec
from fastdiff.backends.base import Backend
from fastdiff.weights import read_configs

_TORCH = {}  # tensorrt.DataType -> torch dtype, filled on first use


def _torch_dtype(trt, dt) -> torch.dtype:
    if not _TORCH:
        _TORCH.update({trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64})
    return _TORCH[dt]


class _Engine:
    """One engine, its context and static buffers (max profile shape) for every I/O tensor."""

    def __init__(self, trt, runtime, plan: Path, device: torch.device):
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {plan} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs, self.buffers = [], [], {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
                shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])  # the profile's max
            else:
                self.outputs.append(name)
                shape = None  # sized below, once the max input shapes are set
            self.buffers[name] = (shape, dtype)
        for name in self.inputs:
            self.context.set_input_shape(name, self.buffers[name][0])
        for name in self.outputs:
            self.buffers[name] = (tuple(self.context.get_tensor_shape(name)), self.buffers[name][1])
        self.buffers = {k: torch.empty(s, dtype=d, device=device) for k, (s, d) in self.buffers.items()}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static = all(
            tuple(self.engine.get_tensor_profile_shape(n, 0)[0]) == tuple(self.engine.get_tensor_profile_shape(n, 0)[2])
            for n in self.inputs
        )

    def __call__(self, feed: dict[str, torch.Tensor], use_graph: bool = False) -> list[torch.Tensor]:
        views = {}
        for name in self.inputs:
            x = feed[name]
            buf = self.buffers[name]
            view = buf.view(-1)[: x.numel()].view(x.shape)  # contiguous prefix of the static buffer
            view.copy_(x)
            views[name] = view
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, view.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = self.buffers[name].view(-1)[: _numel(shape)].view(shape)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream()
        if use_graph and self.static:
            if self.graph is None:  # warm up outside capture, then capture this exact call
                self.context.execute_async_v3(stream.cuda_stream)
                stream.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # captures on torch's side stream (not the legacy default one)
                    self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            self.graph.replay()
        elif not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return [o.clone() for o in outs]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TensorRTBackend(Backend):
    """The four exported networks on fp16 TensorRT engines built from an export of the model."""

    name = "tensorrt"
    device_types = ("cuda",)
    dtypes = (torch.float16,)
    encodes_images = True

    @classmethod
    def auto_cost(cls, device: torch.device) -> float | None:
        return None  # never auto's choice: its engines take only their profiles' sizes

    @classmethod
    def create(cls, root, *, device, dtype, kernels=None, channels_last=False, adapters=None) -> "TensorRTBackend":
        return cls.from_model(root, device=device, dtype=dtype, adapters=adapters)

    def __init__(self, engine_dir: Path, export_dir: Path, *, device: torch.device):
        from fastdiff.export.tensorrt import require_tensorrt

        trt = require_tensorrt()
        self.device, self.dtype = torch.device(device), torch.float16
        self.configs = read_configs(export_dir, exported=True)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        with torch.cuda.device(self.device):
            self.engines = {n: _Engine(trt, runtime, Path(engine_dir) / f"{n}.plan", self.device) for n in iospec.NETWORKS}
        self.lock = threading.Lock()

    @classmethod
    def ready(cls, root: Path) -> bool:
        """Engines for `root`'s default size are already built on this GPU (no build step needed)."""
        try:
            from fastdiff.export.cache import find_export
            from fastdiff.export.tensorrt import find_engines
        except ImportError:
            return False
        export_dir = find_export(root, "fp16", attention="plain")
        return export_dir is not None and find_engines(export_dir, _default_profile(root)) is not None

    @classmethod
    def from_model(cls, root: Path, *, device: torch.device, dtype: torch.dtype, adapters: dict | None = None) -> "TensorRTBackend":
        """Engines for `root` (fp16, dynamic profile around the model's default size; `adapters`
        merged into the export they are built from), built when missing."""
        from fastdiff.export.cache import find_export
        from fastdiff.export.tensorrt import build_engines, require_tensorrt

        require_tensorrt()
        if dtype != torch.float16:
            raise ValueError("backend='tensorrt' runs fp16 engines: use dtype=torch.float16")
        export_dir = find_export(root, "fp16", attention="plain", adapters=adapters)
        if export_dir is None:
            from fastdiff.export.onnx_export import export

            export_dir = export(root, precision="fp16", attention="plain", adapters=adapters)
        return cls(build_engines(export_dir, _default_profile(root)), export_dir, device=device)

    # ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.lock:
            ids = input_ids.to(self.device, torch.int32)
            return self.engines["text_encoder"]({"input_ids": ids})[0]

    @torch.inference_mode()
    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feed = {
            "sample": sample.to(self.device, self.dtype),
            "timestep": torch.as_tensor(timestep).reshape(1).to(self.device, torch.float32),
            "encoder_hidden_states": context.to(self.device, self.dtype),
        }
        with self.lock:
            return self.engines["unet"](feed, use_graph=True)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.engines["vae_decoder"]({"latent_sample": latents.to(self.device, self.dtype)})[0]

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ValueError unless the sides are multiples of the VAE's scale factor (the graph would floor them)
        iospec.dims(self.configs, image.shape[0], image.shape[-2], image.shape[-1])
        with self.lock:
            moments = self.engines["vae_encoder"]({"sample": image.to(self.device, self.dtype)})[0]
        return iospec.latent_gaussian(moments)


def _default_profile(root: Path):
    """Dynamic profile: 1-4 images, 256-1024 px, optimised for the model's default size."""
    from fastdiff.export.tensorrt import Profile

    configs = read_configs(root)
    side = int(configs["unet"].get("sample_size", 64)) * iospec.vae_scale_factor(configs["vae"])
    return Profile.for_request(1, side, side)
