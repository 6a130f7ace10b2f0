"""The CPU attention kernel (fastdiff.kernels.attention_cpu; AMX or AVX512-BF16 matmuls) against
SDPA in float64, its dispatch in fastdiff.ops, and its build cache."""

import logging

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels import attention_cpu, cpu_library

KERNEL = pytest.mark.skipif(not attention_cpu.cpu_can_run(), reason="this CPU has no AVX512-BF16 (the kernel's instructions)")
# the kernel's matmuls: AVX512-BF16 dot products on every CPU it runs on, AMX tiles where there are any
MATMULS = pytest.mark.parametrize(
    "amx", [False, True] if attention_cpu.cpu_has_amx() else [False], ids=lambda a: "amx" if a else "avx512"
)


def views(batch, heads, tokens, d, generator, scale=1.0):
    """[B, heads, tokens, d] views of a [B, tokens, heads * d] tensor, as the models make them."""
    x = torch.randn(batch, tokens, heads * d, generator=generator) * scale
    return x.bfloat16().view(batch, tokens, heads, d).transpose(1, 2)


def reference(q, k, v, scale):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)


def relative_error(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def mean_error(got, want) -> float:
    """Mean |difference| relative to the mean |output|: bf16's output rounding alone gives about
    2e-3, and a 2x slightly off (one polynomial coefficient 2% wrong) about 3.7e-3."""
    return ((got.double() - want).abs().mean() / want.abs().mean()).item()


@KERNEL
@pytest.mark.parametrize(
    "batch, heads, queries, keys, d",
    [
        (1, 1, 1, 1, 2),  # one query, one key: the output is v
        (1, 2, 37, 19, 8),  # queries and keys not multiples of 16 or 32
        (3, 3, 100, 77, 40),  # cross-attention's 77 keys, batch 3
        (2, 8, 64, 64, 160),  # SD1.5's widest head
        (1, 2, 33, 4100, 40),  # keys past 4096 (the score buffer's row stride)
        (2, 1, 31, 33, 80),
        (1, 1, 16, 50, 130),  # a head dim that is neither a multiple of 16 nor of 32
        (1, 1, 40, 300, 512),  # the VAE's single head
    ],
)
@MATMULS
def test_matches_float64(batch, heads, queries, keys, d, amx):
    g = torch.Generator().manual_seed(queries * 1000 + keys)
    q, k, v = views(batch, heads, queries, d, g), views(batch, heads, keys, d, g), views(batch, heads, keys, d, g)
    scale = d**-0.5
    want = reference(q, k, v, scale)
    got = attention_cpu.attention(q, k, v, scale, amx=amx)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.transpose(1, 2).is_contiguous()  # laid out as [B, N, heads, d]
    assert relative_error(got, want) <= max(2 * relative_error(sdpa, want), 8e-3)
    assert mean_error(got, want) <= 1.25 * mean_error(sdpa, want) + 1e-4  # no worse than SDPA's bf16


@KERNEL
@pytest.mark.parametrize("logit_scale", [0.0, 30.0])
@MATMULS
def test_softmax_edges(logit_scale, amx):
    """All scores equal (the output is the mean of v) and scores tens of units apart (one key takes
    nearly all the weight: the row maximum must be subtracted before 2^x)."""
    g = torch.Generator().manual_seed(3)
    q = views(2, 2, 40, 40, g, scale=logit_scale)
    k, v = views(2, 2, 70, 40, g), views(2, 2, 70, 40, g)
    want = reference(q, k, v, 40**-0.5)
    got = attention_cpu.attention(q, k, v, 40**-0.5, amx=amx)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) <= 8e-3


@KERNEL
def test_any_strides():
    """Contiguous [B, heads, N, d] tensors, a slice of the tokens and the default scale."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 50, 24, generator=g).bfloat16()
    kv = torch.randn(2, 3, 90, 48, generator=g).bfloat16()
    k, v = kv[:, :, 5:85, :24], kv[:, :, 5:85, 24:]
    got = attention_cpu.attention(q, k, v)
    assert relative_error(got, reference(q, k, v, 24**-0.5)) <= 8e-3


def test_supported_shapes():
    def qkv(dtype=torch.bfloat16, d=40, keys=10):
        return torch.zeros(1, 2, 8, d, dtype=dtype), torch.zeros(1, 2, keys, d, dtype=dtype), torch.zeros(1, 2, keys, d, dtype=dtype)

    assert attention_cpu.supported(*qkv())
    assert not attention_cpu.supported(*qkv(torch.float32))
    assert not attention_cpu.supported(*qkv(d=41))  # head dims move in pairs
    assert not attention_cpu.supported(*qkv(d=attention_cpu.MAX_HEAD_DIM + 2))
    assert not attention_cpu.supported(*qkv(keys=attention_cpu.MAX_KEYS + 1))
    q, k, v = qkv()
    assert not attention_cpu.supported(q.transpose(2, 3), k, v)  # a head's vector is not contiguous
    assert not attention_cpu.supported(q, k, v[:, :, :5])  # keys and values disagree


@pytest.mark.parametrize("amx", [False, True])
def test_pays_by_scores_and_on_amx_by_head_dim(monkeypatch, amx):
    """SDPA keeps few scores per head everywhere, and on an AMX CPU the heads wider than
    AMX_MAX_HEAD_DIM (the VAE's), where it led there; the AVX512-BF16 matmuls take those."""
    monkeypatch.setattr(attention_cpu, "cpu_has_amx", lambda flags=None: amx)

    def qk(queries, keys, d):
        return torch.zeros(1, 1, queries, d), torch.zeros(1, 1, keys, d)

    assert not attention_cpu.pays(*qk(64, 64, 40))  # SDPA_MAX_SCORES
    assert attention_cpu.pays(*qk(64, 65, 40))
    assert attention_cpu.pays(*qk(1024, 1024, attention_cpu.AMX_MAX_HEAD_DIM))
    assert attention_cpu.pays(*qk(1024, 1024, 512)) is not amx


def test_amx_matmuls_need_amx(monkeypatch):
    monkeypatch.setattr(attention_cpu, "cpu_has_amx", lambda flags=None: False)
    q = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="amx=True"):
        attention_cpu.attention(q, q, q, amx=True)


@KERNEL
def test_dispatch():
    """ops.attention runs the kernel for bf16 on the CPU in "auto" mode only, and its result is the kernel's."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (views(1, 2, 80, 40, g) for _ in range(3))
    with ops.kernels("auto"):
        assert ops.attention_path(q, k, v) == "cpu"
        assert ops.attention_path(q[:, :, :64], k[:, :, :64], v[:, :, :64]) == "torch"  # SDPA_MAX_SCORES
        assert torch.equal(ops.attention(q, k, v, 0.3), attention_cpu.attention(q, k, v, 0.3))
        assert ops.attention_path(q, k, v, causal=True) == "torch"
        assert ops.attention_path(q.float(), k.float(), v.float()) == "torch"
        q.requires_grad_(True)
        assert ops.attention_path(q, k, v) == "torch"  # no backward
        with torch.no_grad():
            assert ops.attention_path(q, k, v) == "cpu"
    with ops.kernels("torch"):
        assert ops.attention_path(q, k, v) == "torch"


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A cache of its own, and the process's loaded library forgotten before and after."""
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    attention_cpu.forget()
    yield tmp_path / "kernels"
    attention_cpu.forget()


@KERNEL
def test_damaged_library_is_rebuilt(fresh_build):
    """A cached library that does not load (truncated by a killed copy, say) is built again. (It is
    damaged before this process maps it: a library in use is only ever replaced, never rewritten.)"""
    path = cpu_library.library_path(cpu_library.compiler(), attention_cpu.SOURCE, cpu_library.FLAGS + attention_cpu.COMPILE_FLAGS)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF" + bytes(100))
    assert attention_cpu.library() is not None
    assert path.stat().st_size > 1000
    assert [p.name for p in fresh_build.iterdir()] == [path.name]  # nothing half-written left behind
    g = torch.Generator().manual_seed(7)
    q, k, v = (views(1, 2, 20, 40, g) for _ in range(3))
    assert relative_error(attention_cpu.attention(q, k, v, 0.2), reference(q, k, v, 0.2)) <= 8e-3


@KERNEL
def test_without_a_compiler_sdpa_runs(fresh_build, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    g = torch.Generator().manual_seed(6)
    q, k, v = (views(1, 2, 80, 40, g) for _ in range(3))
    with caplog.at_level(logging.WARNING, logger="fastdiff"), ops.kernels("auto"):
        assert ops.attention_path(q, k, v) == "torch"
        assert torch.equal(ops.attention(q, k, v, 0.3), ops.attention_ref(q, k, v, 0.3))
    assert "no C compiler found" in caplog.text and "SDPA runs instead" in caplog.text
    assert not fresh_build.exists() or not list(fresh_build.iterdir())


def test_cache_key_follows_source_flags_and_compiler(tmp_path, monkeypatch):
    """The library's name changes with the source, the headers it includes, the flags and the compiler (content hash)."""
    cc = cpu_library.compiler()
    if cc is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    source = tmp_path / "k.c"
    source.write_text("int f(void) { return 1; }\n")
    first = cpu_library.library_path(cc, source, ("-O2",))
    assert first == cpu_library.library_path(cc, source, ("-O2",))
    assert first != cpu_library.library_path(cc, source, ("-O3",))
    source.write_text("int f(void) { return 2; }\n")
    assert first != cpu_library.library_path(cc, source, ("-O2",))
    assert first.parent == tmp_path / "kernels"
    source.write_text('#include "k.h"\nint f(void) { return K; }\n')  # and with the headers it includes
    (tmp_path / "k.h").write_text("#define K 1\n")
    with_header = cpu_library.library_path(cc, source, ("-O2",))
    (tmp_path / "k.h").write_text("#define K 2\n")
    assert with_header != cpu_library.library_path(cc, source, ("-O2",))


def test_a_refusal_at_load_is_logged_not_rebuilt(tmp_path, monkeypatch, caplog):
    """`declare` raising RuntimeError (Linux refusing AMX state, say) gives None and a log line; the
    built file is kept, not taken for damaged and compiled again."""
    if cpu_library.compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("FASTDIFF_CACHE", str(tmp_path))
    source = tmp_path / "refuses.c"
    source.write_text("int refuses_init(void) { return -1; }\n")

    def declare(lib):
        if lib.refuses_init() != 0:
            raise RuntimeError("refused by the test")

    try:
        with caplog.at_level(logging.WARNING, logger="fastdiff"):
            assert cpu_library.library(source, (), declare, "the test's fallback") is None
        (built,) = (tmp_path / "kernels").glob("refuses-*.so")
        stamp = built.stat().st_mtime_ns
        cpu_library.forget(source)
        assert cpu_library.library(source, (), declare, "the test's fallback") is None
        assert built.stat().st_mtime_ns == stamp
        assert "refused by the test" in caplog.text and "the test's fallback runs instead" in caplog.text
    finally:
        cpu_library.forget(source)
