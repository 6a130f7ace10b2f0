"""Export fastdiff's text encoder, UNet, VAE decoder and VAE encoder to ONNX, in Optimum's folder layout.

Exporter: torch.onnx.export(dynamo=True) with `dynamic_shapes`. The TorchScript exporter still
exists in torch 2.13 and was faster on the SD1.5 UNet (79 s against 176 s here, same 2-core
machine), but it is deprecated, takes no onnxscript translations (the MultiHeadAttention below),
and bakes Python branches into the graph without a guard (the UNet's upsample-size branch: an odd
latent side then fails inside onnxruntime). The dynamo exporter states its shape assumptions
(latent sides are declared multiples of 2^(levels-1), which the backends check) and emits
readable ops (LayerNormalization, InstanceNormalization, Gelu). ops.py routes every op to its
torch reference while exporting.

Attention: with `attention="mha"` (the default, for onnxruntime) every unmasked
scaled_dot_product_attention becomes one com.microsoft MultiHeadAttention node, through a custom
translation; "plain" keeps ONNX's MatMul/Softmax/MatMul (TensorRT fuses that form itself). On
onnxruntime's CPU provider the node made the UNet step faster (README, "Export and backends";
`python benchmarks/latency.py` measures it).

fp16: the modules are traced in half precision (time embedding angles stay float32 as the model
computes them), then InstanceNormalization / LayerNormalization / Softmax nodes get Cast nodes so
their statistics run in float32. A VAE whose config says `force_upcast` (SD1.5's does: it
overflows in fp16) is exported in float32 inside, with float16 inputs and outputs (decoder and
encoder alike).

The VAE encoder outputs the Gaussian's moments, not a sample: the pipeline draws the sample with
its own generator (`fastdiff.iospec` says why).

Every export is checked (onnx.checker, then onnxruntime against the torch module on fresh
inputs of a size other than the traced one) before `manifest.json` is written and the folder is
renamed into place; see `fastdiff.export.cache` for the keys and validation.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastdiff import iospec, lora, ops, sd15
from fastdiff.export import cache
from fastdiff.export.cache import ExportOptions, Shapes
from fastdiff.weights import read_config, read_configs

log = logging.getLogger("fastdiff.export")

EXTERNAL_DATA = "model.onnx_data"  # Optimum's name for the weights of a > 2 GB graph
LARGE = 1_800_000_000  # bytes of weights above which they go to EXTERNAL_DATA (protobuf caps files at 2 GB)
FP32_OPS = ("InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax")
TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (3e-2, 3e-2)}  # (atol, rtol vs max |reference|)


class ExportError(RuntimeError):
    """The export could not be made, or the written files do not match the torch modules."""


# ----------------------------------------------------------------------------------------------
# the modules as exported: Optimum's input and output names, in the order of iospec


class TextEncoderExport(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)  # (last_hidden_state, pooler_output); int32 ids index fine


class UNetExport(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states)


class VaeDecoderExport(nn.Module):
    """latent_sample (already divided by the scaling factor) -> image in about [-1, 1]."""

    def __init__(self, model: nn.Module, upcast: bool = False):
        super().__init__()
        self.model, self.upcast = model, upcast

    def forward(self, latent_sample):
        if self.upcast:  # fp16 I/O around a float32 decoder
            return self.model.decode(latent_sample.float()).to(latent_sample.dtype)
        return self.model.decode(latent_sample)


class VaeEncoderExport(nn.Module):
    """image in [-1, 1] -> latent_parameters: the Gaussian's mean, then its clamped logvar."""

    def __init__(self, model: nn.Module, upcast: bool = False):
        super().__init__()
        self.model, self.upcast = model, upcast

    def forward(self, sample):
        mean, logvar = self.model.encode(sample.float() if self.upcast else sample)  # 2 x [B, latent, h, w]
        moments = torch.cat([mean, logvar], dim=1)  # [B, 2 * latent, h, w]
        return moments.to(sample.dtype) if self.upcast else moments  # fp16 I/O around a float32 encoder


def wrap(name: str, module: nn.Module, configs: dict, precision: str) -> nn.Module:
    """The export wrapper of network `name`, in the precision it is traced in."""
    half = precision == "fp16"
    if half:
        module = copy.deepcopy(module)  # keep the caller's float32 module: it is the check's reference
    if name == "text_encoder":
        return TextEncoderExport(module.half() if half else module).eval()
    if name == "unet":
        return UNetExport(module.half() if half else module).eval()
    upcast = half and bool(configs["vae"].get("force_upcast", True))
    vae = module.half() if half and not upcast else module
    if name == "vae_encoder":
        return VaeEncoderExport(vae, upcast=upcast).eval()
    return VaeDecoderExport(vae, upcast=upcast).eval()


# ----------------------------------------------------------------------------------------------
# loading the torch modules


def load_networks(model_root: Path) -> dict[str, nn.Module]:
    """fastdiff's three modules with the model's weights, float32 on the CPU, keyed by iospec name
    (the VAE under both vae_decoder and vae_encoder: one module, loaded once)."""
    from fastdiff.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig
    from fastdiff.weights import find_weights, load_module

    root = Path(model_root)
    out = {}
    for name, cls, cfg in (
        ("text_encoder", CLIPTextModel, CLIPTextConfig),
        ("unet", UNet2DConditionModel, UNetConfig),
        ("vae_decoder", AutoencoderKL, VAEConfig),
    ):
        sub = root / iospec.NETWORKS[name].source
        out[name] = load_module(cls, cfg.from_json(sub / "config.json"), find_weights(sub))
    out["vae_encoder"] = out["vae_decoder"]
    return out


def random_networks(seed: int = 0) -> dict[str, nn.Module]:
    """SD1.5's architecture with torch's default random init (for timing exports only)."""
    from fastdiff.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig

    torch.manual_seed(seed)
    c = sd15.SD15_CONFIGS
    vae = AutoencoderKL(VAEConfig.from_dict(c["vae"])).eval().requires_grad_(False)
    return {
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(c["text_encoder"])).eval().requires_grad_(False),
        "unet": UNet2DConditionModel(UNetConfig.from_dict(c["unet"])).eval().requires_grad_(False),
        "vae_decoder": vae,
        "vae_encoder": vae,
    }


# ----------------------------------------------------------------------------------------------
# sizes: traced, checked


def latent_multiple(configs: dict) -> int:
    """Latent sides must be multiples of this for the dynamic UNet graph (one per downsampling)."""
    return 2 ** (len(configs["unet"]["block_out_channels"]) - 1)


def trace_size(configs: dict, options: ExportOptions) -> tuple[int, int, int]:
    """(batch, height, width) the modules are traced at."""
    if options.static:
        return options.static.batch, options.static.height, options.static.width
    f, m = iospec.vae_scale_factor(configs["vae"]), latent_multiple(configs)
    side = max(configs["unet"].get("sample_size", 64) // m, 2) * m * f  # the model's default size
    return 2, side, side


def check_size(configs: dict, options: ExportOptions) -> tuple[int, int, int]:
    """(batch, height, width) the files are checked at: for a dynamic export, a small non-square
    size other than the traced one, so the check also proves the axes are dynamic."""
    if options.static:
        return options.static.batch, options.static.height, options.static.width
    f, m = iospec.vae_scale_factor(configs["vae"]), latent_multiple(configs)
    unit = m * max(1, 8 // m)  # at least 8 latent cells per side unit, to exercise attention
    return 1, 2 * unit * f, 3 * unit * f


def batch_for(name: str, batch: int, options: ExportOptions) -> int:
    """Rows of network `name` for `batch` images: text encoder and UNet see CFG's 2x in static
    exports; the VAE decoder and encoder one row per image."""
    return 2 * batch if options.static and not iospec.NETWORKS[name].per_image else batch


def dynamic_shapes(net: iospec.NetworkSpec, configs: dict) -> dict:
    """torch.export Dims for the dynamic axes; UNet latent sides as multiples of `latent_multiple`
    and image sides (the VAE encoder's input) as multiples of the VAE's scale factor, so the traced
    graph is exact for every size it accepts."""
    m, f = latent_multiple(configs), iospec.vae_scale_factor(configs["vae"])
    batch = torch.export.Dim("batch", min=1, max=4096)
    sides = {}
    for axis in ("latent_height", "latent_width"):
        if net.name == "unet":
            sides[axis] = m * torch.export.Dim(f"{axis}_blocks", min=1, max=4096 // m)
        else:
            sides[axis] = torch.export.Dim(axis, min=1, max=4096)
    for axis in ("height", "width"):
        sides[axis] = f * torch.export.Dim(f"{axis}_cells", min=1, max=4096)
    out = {}
    for t in net.inputs:
        axes = {i: batch if s == "batch" else sides[s] for i, s in enumerate(t.shape) if s in iospec.DYNAMIC}
        out[t.name] = axes or None
    return out


# ----------------------------------------------------------------------------------------------
# attention as com.microsoft MultiHeadAttention


def _mha_translation():
    """An onnxscript translation of aten.scaled_dot_product_attention that emits one
    com.microsoft MultiHeadAttention node when there is no mask, else the default form."""
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention
    from onnxscript.values import Op, Opset

    # onnx does not know onnxruntime's contrib ops; a schema of the part we use lets onnxscript emit it.
    schema = OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[OpSchema.FormalParameter(n, "T") for n in ("query", "key", "value")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "", required=True),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "", required=False),
        ],
    )
    mha = Op(Opset("com.microsoft", 1), "MultiHeadAttention", schema)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        heads, head_dim = query.shape[1], query.shape[3]
        if attn_mask is not None or is_causal or dropout_p or enable_gqa or not isinstance(heads, int):
            return aten_scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        merge = op.Constant(value_ints=[0, 0, -1])
        # [B, heads, tokens, d] -> [B, tokens, heads * d]: the layout MultiHeadAttention takes
        q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), merge) for t in (query, key, value))
        attrs = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
        o = mha(q, k, v, **attrs)  # [B, tokens, heads * d]
        o = op.Reshape(o, op.Constant(value_ints=[0, 0, heads, head_dim]))  # [B, tokens, heads, d]
        return op.Transpose(o, perm=[0, 2, 1, 3])  # [B, heads, tokens, d]

    return {torch.ops.aten.scaled_dot_product_attention.default: sdpa}


# ----------------------------------------------------------------------------------------------
# graph passes (onnx_ir, before saving)


def upcast_sensitive_ops(model) -> int:
    """Run float16 InstanceNorm / LayerNorm / GroupNorm / Softmax nodes in float32 (Cast in and
    out): their sums of squares and exponentials overflow float16. Returns the nodes changed."""
    import onnx_ir as ir

    FP16, FP32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
    graph, changed = model.graph, 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in FP32_OPS:
            continue
        if node.inputs[0] is None or node.inputs[0].dtype != FP16:
            continue
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype == FP16:
                cast = ir.Node("", "Cast", [v], [ir.AttrInt64("to", FP32)], name=f"{node.name}_in{i}_fp32")
                cast.outputs[0].dtype, cast.outputs[0].shape = FP32, v.shape
                graph.insert_before(node, cast)
                node.replace_input_with(i, cast.outputs[0])
        for out in node.outputs:
            if out.dtype != FP16:
                continue
            uses = list(out.uses())  # (consumer, input index), taken before the Cast back adds one
            back = ir.Node("", "Cast", [out], [ir.AttrInt64("to", FP16)], name=f"{node.name}_out_fp16")
            back.outputs[0].dtype, back.outputs[0].shape = FP16, out.shape
            for consumer, index in uses:
                consumer.replace_input_with(index, back.outputs[0])
            if out.is_graph_output():  # the Cast back takes over the output's slot and name
                i, name = list(graph.outputs).index(out), out.name
                out.name = f"{name}_fp32"
                back.outputs[0].name = name
                graph.outputs[i] = back.outputs[0]
            out.dtype = FP32
            graph.insert_after(node, back)
        changed += 1
    return changed


def name_axes(model, net: iospec.NetworkSpec, static: bool) -> None:
    """Give graph inputs/outputs iospec's axis names (the exporter leaves expressions like 8*s0)."""
    import onnx_ir as ir

    values = {v.name: v for v in list(model.graph.inputs) + list(model.graph.outputs)}
    for t in net.tensors:
        v = values[t.name]
        if static or v.shape is None:
            continue
        v.shape = ir.Shape([s if s in iospec.DYNAMIC else d for s, d in zip(t.shape, v.shape)])


# ----------------------------------------------------------------------------------------------
# one network


def _torch_export(name, module, configs, inputs, net, options):
    return torch.onnx.export(
        wrap(name, module, configs, options.precision),
        (),
        kwargs=inputs,
        dynamo=True,
        input_names=[t.name for t in net.inputs],
        output_names=[t.name for t in net.outputs],
        dynamic_shapes=None if options.static else dynamic_shapes(net, configs),
        opset_version=options.opset,
        custom_translation_table=_mha_translation() if options.attention == "mha" else None,
        verbose=False,
    )


def export_network(name: str, module: nn.Module, configs: dict, path: Path, options: ExportOptions) -> dict:
    """Trace, translate and save network `name` to `path` (model.onnx). Returns facts for the manifest."""
    import onnx_ir as ir

    net = iospec.NETWORKS[name]
    batch, height, width = trace_size(configs, options)
    inputs = iospec.sample_inputs(
        net, configs, batch=batch_for(name, batch, options), height=height, width=width, precision=options.precision
    )
    t0 = time.perf_counter()
    with ops.kernels("torch"):  # the readable reference ops, whatever FASTDIFF_KERNELS says
        program = _torch_export(name, module, configs, inputs, net, options)
    model = program.model
    casts = upcast_sensitive_ops(model) if options.precision == "fp16" else 0
    name_axes(model, net, static=options.static is not None)
    model.producer_name, model.producer_version = "fastdiff", _fastdiff_version()
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, path, external_data=EXTERNAL_DATA if weight_bytes > LARGE else None)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "weight_bytes": int(weight_bytes),
        "external_data": weight_bytes > LARGE,
        "fp32_islands": casts,
        "mha_nodes": sum(1 for n in model.graph if n.op_type == "MultiHeadAttention"),
    }


# ----------------------------------------------------------------------------------------------
# checks


def check_network(name: str, module: nn.Module, configs: dict, path: Path, options: ExportOptions, providers=None) -> float:
    """onnx.checker on the file, then onnxruntime vs the torch module (float32) on fresh inputs.

    Returns the max abs error over the outputs; raises ExportError above the tolerance.
    """
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path))  # path-based: works for > 2 GB models
    except Exception as e:  # onnx raises several types
        raise ExportError(f"{path}: onnx.checker failed: {e}") from e
    net = iospec.NETWORKS[name]
    batch, height, width = check_size(configs, options)
    g = torch.Generator().manual_seed(secrets.randbits(31))
    inputs = iospec.sample_inputs(
        net, configs, batch=batch_for(name, batch, options), height=height, width=width,
        precision=options.precision, generator=g,
    )
    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.inference_mode(), ops.kernels("torch"):
        ref = wrap(name, module, configs, "fp32")(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    ref = ref if isinstance(ref, tuple) else (ref,)
    atol, rtol = TOLERANCE[options.precision]
    worst = 0.0
    for t, a, b in zip(net.outputs, got, ref):
        b = b.float().numpy()
        if a.shape != b.shape:
            raise ExportError(f"{name}: output {t.name} has shape {a.shape} in onnxruntime, {b.shape} in torch")
        err = float(np.abs(a.astype(np.float32) - b).max())
        limit = atol + rtol * float(np.abs(b).max())
        if not err <= limit:  # also catches NaN
            raise ExportError(
                f"{name}: onnxruntime output {t.name} differs from the torch module by max abs {err:.3g} "
                f"(tolerance {limit:.3g} for {options.precision}) at batch {batch}, {height}x{width}"
            )
        worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------------------------
# the folder


def _fastdiff_version() -> str:
    try:
        from importlib.metadata import version

        return version("fastdiff")
    except Exception:
        return "0"


def model_index(source: dict) -> dict:
    """The source's model_index.json, with the networks as ONNX models (Optimum's / diffusers' ONNX layout)."""
    index = {k: v for k, v in source.items() if k not in ("vae", "safety_checker", "feature_extractor", "image_encoder")}
    index["_class_name"] = "OnnxStableDiffusionPipeline"
    for name in iospec.NETWORKS:
        index[name] = ["diffusers", "OnnxRuntimeModel"]
    index.update(safety_checker=[None, None], feature_extractor=[None, None])
    index["requires_safety_checker"] = False
    return index


def _write_side_files(folder: Path, model_root: Path | None, configs: dict) -> None:
    """Configs of each network, tokenizer/, scheduler/ and model_index.json."""
    for name, net in iospec.NETWORKS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(configs[net.source], indent=2))
    if model_root is not None:
        shutil.copytree(model_root / "tokenizer", folder / "tokenizer")
        shutil.copytree(model_root / "scheduler", folder / "scheduler")
        source_index = read_config(model_root / "model_index.json")
    else:
        from fastdiff.weights import ASSETS

        shutil.copytree(ASSETS / "clip-tokenizer", folder / "tokenizer")
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd15.SD15_SCHEDULER, indent=2))
        source_index = {
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", "PNDMScheduler"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        }
    (folder / "model_index.json").write_text(json.dumps(model_index(source_index), indent=2))


def export(
    model: str | os.PathLike = "sd15",
    *,
    precision: str = "fp32",
    static: Shapes | None = None,
    attention: str = "mha",
    out: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
    force: bool = False,
    providers: list | None = None,
    config: str | os.PathLike | None = None,
    adapters: dict[str, float] | None = None,
) -> Path:
    """Export `model` (a known name, a diffusers folder, or a single-file checkpoint with the
    configs of the diffusers folder `config`, else SD1.5's) to ONNX; returns the export folder.
    `adapters` ({.safetensors path: weight}): LoRA adapters merged into the modules first; the
    export's key includes their content and weights.

    Reuses a valid folder with the same content key; otherwise builds it in a temp folder next to
    the target, checks every file, writes manifest.json last and renames the folder into place.
    `random_weights` (with "sd15" only) builds SD1.5's architecture with random weights, for timing.
    """
    options = ExportOptions(precision=precision, static=static, attention=attention, random_weights=random_weights)
    adapters = lora.check_weights(adapters)
    if random_weights:
        if str(model) != "sd15":
            raise ValueError("--random-weights builds SD1.5's architecture: use it with MODEL sd15")
        model_root, configs, source_sha = None, sd15.SD15_CONFIGS, cache.random_source_hash(seed)
    else:
        from fastdiff.weights import resolve_model

        model_root = resolve_model(model, config)
        configs = read_configs(model_root)
        source_sha = cache.source_hash(model_root)
    base_sha = source_sha
    if adapters:  # read and checked before any export work
        layers = lora.read_adapters(adapters, lora.model_modules(configs))
        source_sha = cache.with_adapters(source_sha, adapters)
    if static is not None:
        iospec.dims(configs, static.batch, static.height, static.width)  # raises on sizes the VAE cannot make
    key = cache.export_key(source_sha, options)
    name = cache.folder_name(cache.model_name(model, model_root) + ("-lora" if adapters else ""), options, key)
    final = Path(out).expanduser().resolve() if out is not None else cache.exports_dir() / name

    with cache.locked(final.parent / f".{final.name}.lock"):
        ok, why = cache.validate(final, key)
        if ok and not force:
            log.info("fastdiff.export: reusing %s (same content key)", final)
            if adapters:
                cache.touch_manifest(final)
            return final
        if final.exists():
            ours = final.parent == cache.exports_dir() or (final / cache.MANIFEST).exists() or not any(final.iterdir())
            if not ours:  # never delete a user's folder that is not an export
                raise ValueError(f"--out {final}: the folder exists and is not a fastdiff export; choose another")
            log.info("fastdiff.export: rebuilding %s (%s)", final, why)
        cache.remove_stale_temps(final.parent)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            manifest = _build(tmp, model_root, configs, options, providers, seed, layers if adapters else None)
            manifest.update(
                key=key,
                model={"name": str(model), "root": str(model_root) if model_root else None, "source_sha256": source_sha,
                       "base_source_sha256": base_sha},  # fmt: skip
                random_weights=random_weights,
                seed=seed if random_weights else None,
                adapters=[{"path": p, "weight": w} for p, w in adapters.items()],
            )
            manifest["files"] = cache.hash_files(tmp)
            cache.write_manifest(tmp, manifest)  # last: a folder without it is never valid
            cache.replace_folder(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("fastdiff.export: wrote %s", final)
    if adapters and out is None:  # bound the disk adapter exports take in the cache
        for old in cache.prune_adapted(final, base_sha):
            log.info("fastdiff.export: removed %s (older LoRA export of the same model; FASTDIFF_LORA_EXPORTS)", old)
    return final


def _build(folder: Path, model_root: Path | None, configs: dict, options: ExportOptions, providers, seed: int,
           adapters: tuple[list, list] | None = None) -> dict:
    folder.mkdir(parents=True)
    modules = random_networks(seed) if model_root is None else load_networks(model_root)
    if adapters is not None:  # (layers, weights): merged once into the float32 modules; every check below sees them
        lora.merge({t: modules[t] for t in lora.TARGETS}, *adapters, base={})
    _write_side_files(folder, model_root, configs)
    nets, errors = {}, {}
    for name in iospec.NETWORKS:
        path = folder / name / "model.onnx"
        log.info("fastdiff.export: exporting %s ...", name)
        nets[name] = export_network(name, modules[name], configs, path, options)
        nets[name]["bytes"] = sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith("model.onnx"))
        errors[name] = check_network(name, modules[name], configs, path, options, providers)
        log.info(
            "fastdiff.export: %-12s %6.1f s  %8.1f MB  max abs err vs torch %.2e",
            name, nets[name]["seconds"], nets[name]["bytes"] / 1e6, errors[name],
        )
        nets[name]["max_abs_err"] = errors[name]
    batch, height, width = trace_size(configs, options)
    sizes = {name: iospec.dims(configs, batch_for(name, batch, options), height, width) for name in iospec.NETWORKS}
    return {
        "format": cache.FORMAT,
        "options": options.as_dict(),
        "versions": cache.versions(),
        "networks": nets,
        "io": {
            name: {
                t.name: {
                    "dtype": str(t.torch_dtype(options.precision)).replace("torch.", ""),
                    "shape": [s if (s in iospec.DYNAMIC and not options.static) else sizes[name][s] for s in t.shape],
                }
                for t in net.tensors
            }
            for name, net in iospec.NETWORKS.items()
        },
        "latent_multiple": latent_multiple(configs) if not options.static else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
