"""The Winograd F(2x2, 3x3) convolution (fastdiff.kernels.winograd_cpu) against F.conv2d in
float64, its error against the direct bf16 convolution's, and its dispatch in fastdiff.ops."""

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels import winograd_cpu as kernel
from fastdiff.testing import relative_rms

RUNS = pytest.mark.skipif(not kernel.cpu_can_run(), reason="the kernel runs on CPUs with AVX512-BF16 and without AMX; this is not one")
ZEN4 = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"})
AMX = ZEN4 | {"amx_tile", "amx_bf16", "amx_int8"}


def operands(B, C, Co, H, W, seed, residual=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(Co, C, 3, 3, generator=g) / (9 * C) ** 0.5).bfloat16()
    b = torch.randn(Co, generator=g).bfloat16()
    r = torch.randn(B, Co, H, W, generator=g).bfloat16().contiguous(memory_format=torch.channels_last) if residual else None
    return x, w, b, r


def test_cpu_can_run_on_faked_flags():
    assert kernel.cpu_can_run(ZEN4)
    assert not kernel.cpu_can_run(AMX)  # not measured there: oneDNN's direct convolutions stay
    assert not kernel.cpu_can_run(frozenset({"avx2", "fma"}))  # no AVX512-BF16


@RUNS
@pytest.mark.parametrize(
    "B, C, Co, H, W, residual",
    [
        (1, 16, 16, 1, 1, True),  # one pixel: every tap but the centre is padding
        (2, 32, 48, 7, 9, False),  # odd sides: the last tile row and column are half written
        (1, 64, 32, 5, 4, True),  # more inputs than outputs, odd height
        (3, 320, 320, 16, 16, False),  # an SD1.5 level, batch 3
    ],
)
@pytest.mark.parametrize("chunks", ["one", "several"])
def test_matches_float64(B, C, Co, H, W, residual, chunks, monkeypatch):
    if chunks == "several":  # 3 tiles a chunk: a ragged last chunk wherever the tiles are not a multiple of 3
        monkeypatch.setattr(kernel, "CHUNK_BYTES", 3 * 16 * 2 * max(C, Co))
    x, w, b, r = operands(B, C, Co, H, W, seed=B * 1000 + C + H * W, residual=residual)
    u = kernel.transform_weight(w)
    packed = tuple(torch.ops.mkldnn._reorder_linear_weight(u[k], kernel.tiles(x)) for k in range(16))
    got = kernel.conv2d(x, packed, b.float(), Co, r)
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1) + (0 if r is None else r.double())
    direct = F.conv2d(x, w, b, padding=1) + (0 if r is None else r)
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    # the transformed input is rounded to bf16 once more than the direct way's operands; measured
    # 1.3-3x the direct convolution's error (benchmarks/winograd_cpu.py), bounded here at 4x
    assert relative_rms(got, want) <= 4 * max(relative_rms(direct, want), 2e-3)
    assert (got.double() - want).abs().max() <= 0.05 * want.abs().max()


@RUNS
def test_conv2d_takes_it_where_it_pays(monkeypatch):
    x, w, b, r = operands(2, 64, 32, 8, 8, seed=3, residual=True)
    with torch.no_grad(), ops.kernels("auto"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "packed"  # 2.4M multiply-adds: the embedded model's size
        big = torch.empty(2, 320, 16, 16, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        assert ops.conv_path(big, torch.empty(640, 320, 3, 3, dtype=torch.bfloat16), (1, 1), (1, 1)) == "winograd"  # SD1.5, 256 px
        monkeypatch.setattr(kernel, "MIN_MULTIPLY_ADDS", 0)
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "winograd"
        assert ops.conv_path(x[:, :, :4, :4], w, (1, 1), (1, 1)) == "packed"  # 16 pixels, under MIN_PIXELS
        assert ops.conv_path(x, w, (2, 2), (1, 1)) == "packed"  # stride 2
        assert ops.conv_path(x.float(), w.float(), (1, 1), (1, 1)) != "winograd"
        assert ops.conv_path(x, w[:, :, :1, :1].contiguous(), (1, 1), (0, 0)) != "winograd"  # 1x1
        fused = ops.conv2d(x, w, b, (1, 1), (1, 1), residual=r)  # channels-last residual: added in the kernel
        unfused = ops.conv2d(x, w, b, (1, 1), (1, 1), residual=r.contiguous())  # NCHW residual: added after
    with ops.kernels("torch"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "reference"
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1) + r.double()
    for got in (fused, unfused):
        assert relative_rms(got, want) <= 1.5e-2


@RUNS
def test_in_place_weight_change_is_seen(monkeypatch):
    monkeypatch.setattr(kernel, "MIN_MULTIPLY_ADDS", 0)
    x, w, b, _ = operands(1, 32, 32, 8, 8, seed=4)
    with torch.no_grad(), ops.kernels("auto"):
        before = ops.conv2d(x, w, b, (1, 1), (1, 1))
        w.mul_(-1)  # a LoRA merge changes weights in place
        after = ops.conv2d(x, w, b, (1, 1), (1, 1))
    want = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert relative_rms(after, want) <= 1.5e-2
    assert relative_rms(before, want) > 0.5
