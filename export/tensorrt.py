"""TensorRT engines from an ONNX export (TensorRT 10 Python API).

Engines are built from the fp16 export with plain attention (TensorRT fuses MatMul/Softmax/MatMul
itself and cannot parse com.microsoft ops) as *strongly typed* networks, so TensorRT keeps the
precisions the ONNX graph states: fp16 everywhere except the float32 islands around the norms
and softmax (and a VAE exported with `force_upcast`). They are stored beside the ONNX files:

    <export>/tensorrt/<gpu>-trt<version>/timing.cache
    <export>/tensorrt/<gpu>-trt<version>/<profile key>/{text_encoder,unet,vae_decoder,vae_encoder}.plan, engines.json

keyed by GPU name + TensorRT version (an engine only runs where it was built) and, per profile,
by the ONNX files' sha256 and the shapes. `engines.json` is written last, as the export's
manifest is, and `find_engines` checks it and the plans' sha256 before anything is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastdiff import iospec
from fastdiff.export import cache
from fastdiff.weights import read_configs

log = logging.getLogger("fastdiff.export")

ENGINES_MANIFEST = "engines.json"
WORKSPACE = 8 << 30  # bytes of scratch memory the builder may give a tactic


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing."""


def require_tensorrt():
    """The tensorrt module, or TensorRTUnavailable saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "--engine tensorrt needs the TensorRT Python package (pip install tensorrt) and an NVIDIA GPU; "
            "tensorrt is not installed here. Nothing was exported."
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("--engine tensorrt needs a CUDA GPU; torch sees none. Nothing was exported.")
    return trt


@dataclass(frozen=True)
class Profile:
    """Optimisation profile in images: (batch, height, width) at min / opt / max.

    The text encoder and UNet take up to 2 * batch rows (classifier-free guidance); their min is
    1 row so guidance-free runs fit too. The VAE decoder and encoder take `batch` rows. min == opt
    == max is a static profile.
    """

    min: tuple[int, int, int]
    opt: tuple[int, int, int]
    max: tuple[int, int, int]

    @classmethod
    def for_request(cls, batch: int, height: int, width: int, static: bool = False) -> "Profile":
        req = (batch, height, width)
        if static:
            return cls(req, req, req)
        return cls((1, min(256, height), min(256, width)), req, (max(4, batch), max(1024, height), max(1024, width)))

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    def shapes(self, net: iospec.NetworkSpec, configs: dict) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input name: (min shape, opt shape, max shape)} for network `net`."""
        out = {}
        cfg_rows = not net.per_image
        for which in ("min", "opt", "max"):
            b, h, w = getattr(self, which)
            rows = 2 * b if cfg_rows and (which != "min" or self.static) else b
            for name, shape in net.shapes(iospec.dims(configs, rows, h, w)).items():
                if name in {t.name for t in net.inputs}:
                    out.setdefault(name, []).append(shape)
        return {k: tuple(v) for k, v in out.items()}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def gpu_dir(export_dir: Path, trt) -> Path:
    """<export>/tensorrt/<gpu name>-trt<version>: engines only run on the GPU and TensorRT that built them."""
    import torch

    gpu = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name()).strip("-")
    return Path(export_dir) / "tensorrt" / f"{gpu}-trt{trt.__version__}"


def _profile_dir(export_dir: Path, profile: Profile, trt) -> tuple[Path, str]:
    m = cache.read_manifest(export_dir) or {}
    onnx_sha = {n: m.get("files", {}).get(f"{n}/model.onnx") for n in iospec.NETWORKS}
    blob = json.dumps({"onnx": onnx_sha, "profile": asdict(profile), "trt": trt.__version__}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    return gpu_dir(export_dir, trt) / f"{profile.key()}-{key[:12]}", key


def find_engines(export_dir: Path, profile: Profile) -> Path | None:
    """The folder of valid engines for this export and profile on this GPU, else None."""
    try:
        trt = require_tensorrt()
    except TensorRTUnavailable:
        return None
    folder, key = _profile_dir(export_dir, profile, trt)
    try:
        m = json.loads((folder / ENGINES_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if m.get("key") != key:
        return None
    for rel, digest in m.get("files", {}).items():
        p = folder / rel
        if not p.is_file() or cache.file_sha256(p) != digest:
            return None
    return folder


def build_engines(export_dir: Path, profile: Profile) -> Path:
    """Build (or reuse) an engine per exported network for `profile`; returns their folder."""
    trt = require_tensorrt()
    export_dir = Path(export_dir)
    manifest = cache.read_manifest(export_dir) or {}
    opts = manifest.get("options", {})
    if opts.get("attention") != "plain" or opts.get("precision") != "fp16":
        raise ValueError(f"{export_dir}: TensorRT engines are built from an fp16 export with plain attention")
    found = find_engines(export_dir, profile)
    if found is not None:
        log.info("fastdiff.export: reusing TensorRT engines in %s", found)
        return found
    configs = read_configs(export_dir, exported=True)
    folder, key = _profile_dir(export_dir, profile, trt)
    timing_path = folder.parent / "timing.cache"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with cache.locked(folder.parent / f".{folder.name}.lock"):
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            facts = {}
            for name, net in iospec.NETWORKS.items():
                t0 = time.perf_counter()
                plan = _build_one(trt, export_dir / name / "model.onnx", profile.shapes(net, configs), timing_path)
                (tmp / f"{name}.plan").write_bytes(plan)
                facts[name] = {"seconds": round(time.perf_counter() - t0, 1), "bytes": len(plan)}
                log.info("fastdiff.export: tensorrt %-12s %6.1f s  %8.1f MB", name, facts[name]["seconds"], len(plan) / 1e6)
            files = {p.name: cache.file_sha256(p) for p in sorted(tmp.iterdir())}
            m = {"key": key, "profile": asdict(profile), "tensorrt": trt.__version__, "engines": facts, "files": files}
            (tmp / ENGINES_MANIFEST).write_text(json.dumps(m, indent=2))  # last
            cache.replace_folder(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _build_one(trt, onnx_path: Path, shapes: dict, timing_path: Path) -> bytes:
    """One strongly typed engine with one optimisation profile; updates the shared timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    tmp = timing_path.with_name(f".{timing_path.name}.{os.getpid()}")
    tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    os.replace(tmp, timing_path)
    return bytes(memoryview(plan))
