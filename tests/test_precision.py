"""The dtype rule: decided by the CPU's capability flags (faked here), overridable, and a clear
error for a 16-bit dtype a CPU would only emulate."""

from __future__ import annotations

import logging

import pytest
import torch

from fastdiff import Pipeline, precision

AMX = frozenset({"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
ZEN3 = frozenset({"avx2", "fma", "sse4_2"})  # AVX2, no bf16 instructions
ZEN5 = frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"})  # AVX512-BF16, no AMX
CPU = torch.device("cpu")
REAL = precision.cpu_flags()


@pytest.fixture(autouse=True)
def no_dtype_env(monkeypatch):
    monkeypatch.delenv("FASTDIFF_DTYPE", raising=False)  # conftest pins float32 for the other tests


@pytest.fixture
def flags(monkeypatch):
    def use(fake: frozenset):
        monkeypatch.setattr(precision, "cpu_flags", lambda: fake)

    return use


def test_cpu_flags_read_from_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: every x86-64 CPU this runs on has SSE2
        assert "sse2" in flags or "asimd" in flags


@pytest.mark.parametrize(
    "fake, want",
    [(AMX, torch.bfloat16), (frozenset({"avx512_bf16"}), torch.bfloat16), (ZEN3, torch.float32), (frozenset(), torch.float32)],
)
def test_default_dtype_by_capability(flags, fake, want):
    flags(fake)
    assert precision.default_dtype(CPU) == want
    assert precision.default_dtype(torch.device("cuda")) == torch.float16  # not read from the CPU


def test_explicit_dtype_overrides_and_names_work(flags):
    flags(AMX)
    assert precision.choose_dtype(CPU, torch.float32) == torch.float32
    assert precision.choose_dtype(CPU, "bfloat16") == torch.bfloat16
    assert precision.choose_dtype(CPU, "torch.float32") == torch.float32


@pytest.mark.parametrize("dtype, need", [(torch.bfloat16, "AMX_BF16 or AVX512_BF16"), (torch.float16, "AMX_FP16")])
def test_emulated_dtype_is_refused(flags, dtype, need):
    flags(ZEN3)
    with pytest.raises(ValueError, match=rf"dtype={dtype}: this CPU has no {need} instructions.*use dtype=torch.float32"):
        precision.check_dtype(CPU, dtype)
    flags(AMX | {"avx512_fp16"})
    if dtype == torch.float16:  # neither AMX-BF16 nor AVX512-FP16 makes fp16 matmuls fast
        with pytest.raises(ValueError, match="AMX_FP16"):
            precision.check_dtype(CPU, dtype)
    flags(AMX | {"amx_fp16"})
    assert precision.check_dtype(CPU, dtype) == dtype


@pytest.mark.parametrize("bad", ["float64", "fp16", torch.int8, 3])
def test_unknown_dtype_is_refused(bad):
    with pytest.raises(ValueError, match=r"dtype=.*allowed values are"):
        precision.check_dtype(CPU, bad)


def test_pipeline_takes_the_rule_before_loading(flags, monkeypatch, caplog):
    """from_pretrained checks dtype before any file is read, and logs the default it picked."""
    import fastdiff.pipeline as pl

    flags(ZEN3)
    monkeypatch.setattr(pl, "resolve_model", lambda model: pytest.fail("model work before the dtype check"))
    with pytest.raises(ValueError, match="dtype=torch.bfloat16"):
        Pipeline.from_pretrained(device="cpu", dtype=torch.bfloat16)
    monkeypatch.undo()
    monkeypatch.delenv("FASTDIFF_DTYPE", raising=False)
    flags(AMX)
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        pipe = Pipeline.from_pretrained(device="cpu")  # the embedded model: too small for bf16 to pay
    assert pipe.dtype == torch.float32 and "UNet, too small for bf16 to pay" in caplog.text
    monkeypatch.setattr(precision, "BF16_MIN_UNET_PARAMS", 1000)  # as if it were SD1.5's size
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastdiff"):
        pipe = Pipeline.from_pretrained(device="cpu")
    assert pipe.dtype == torch.bfloat16 and "dtype torch.bfloat16 on this CPU (bf16 matmul" in caplog.text
    flags(REAL)  # the kernels ask the real CPU what it runs (the faked flags would pick bf16 paths it lacks)
    image = pipe.generate("a red circle", steps=2, seed=1, output_type="np")
    assert image.dtype == "float32" and 0 <= image.min() and image.max() <= 1 and image.std() > 1e-3


def test_model_size_narrows_the_cpu_default(flags):
    """bf16 on an AMX CPU only for a UNet of at least BF16_MIN_UNET_PARAMS, on an AVX512-BF16 CPU
    without AMX whatever its size; CUDA and no-bf16 CPUs are not asked; unknown size (None) counts
    as large."""
    flags(AMX)
    n = precision.BF16_MIN_UNET_PARAMS
    assert precision.default_dtype(CPU, unet_params=n) == torch.bfloat16
    assert precision.default_dtype(CPU, unet_params=n - 1) == torch.float32
    assert precision.default_dtype(CPU, unet_params=None) == torch.bfloat16
    assert precision.default_dtype(torch.device("cuda"), unet_params=1) == torch.float16
    flags(ZEN5)
    assert precision.default_dtype(CPU, unet_params=n - 1) == torch.bfloat16
    assert precision.default_dtype(CPU, unet_params=1) == torch.bfloat16
    assert precision.default_dtype(CPU, unet_params=n) == torch.bfloat16
    flags(ZEN3)
    assert precision.default_dtype(CPU, unet_params=10 * n) == torch.float32


def test_parameter_count_from_the_header(tmp_path):
    import safetensors.torch

    from fastdiff.weights import parameter_count

    shapes = [(3, 5), (7,), (2, 3, 4, 1)]
    safetensors.torch.save_file({f"t{i}": torch.zeros(s) for i, s in enumerate(shapes)}, tmp_path / "w.safetensors")
    assert parameter_count(tmp_path / "w.safetensors") == 15 + 7 + 24


def test_environment_and_backend_narrow_the_default(flags, monkeypatch):
    """$FASTDIFF_DTYPE is the default when set (checked like the argument); a backend without the
    capability's dtype gets float32."""
    flags(AMX)
    assert precision.default_dtype(CPU, (torch.float32, torch.float16)) == torch.float32
    assert precision.default_dtype(CPU, (torch.float32, torch.bfloat16)) == torch.bfloat16
    monkeypatch.setenv("FASTDIFF_DTYPE", "float32")
    assert precision.default_dtype(CPU) == torch.float32
    flags(ZEN3)
    monkeypatch.setenv("FASTDIFF_DTYPE", "bfloat16")
    with pytest.raises(ValueError, match="FASTDIFF_DTYPE=torch.bfloat16: this CPU has no"):
        precision.default_dtype(CPU)
