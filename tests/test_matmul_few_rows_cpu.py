"""The AMX kernel for convolutions with few output pixels (fastdiff.kernels.matmul_few_rows_cpu)
against float64, and its dispatch in fastdiff.ops. (Its build cache is cpu_library's, tested with
the attention kernel.)"""

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels import attention_cpu
from fastdiff.kernels import matmul_few_rows_cpu as kernel

AMX = pytest.mark.skipif(not attention_cpu.cpu_has_amx(), reason="this CPU has no AMX-BF16 (the kernel's instructions)")


def errors(got, want) -> tuple[float, float]:
    """Largest and mean |difference| relative to the mean |output|."""
    d = (got.double() - want).abs()
    scale = want.abs().mean()
    return (d.max() / scale).item(), (d.mean() / scale).item()


def inputs(batch, c, n, side, k, generator, layout=torch.channels_last):
    x = torch.randn(batch, c, side[0], side[1], generator=generator).bfloat16().contiguous(memory_format=layout)
    w = (torch.randn(n, c, k, k, generator=generator) / (k * c**0.5)).bfloat16()
    return x, w, torch.randn(n, generator=generator)


@AMX
@pytest.mark.parametrize(
    "batch, c, n, side, k, stride, padding",
    [
        (2, 1280, 1280, (4, 4), 3, 1, 1),  # SD1.5's 4x4 level, CFG batch 2: one pair of 16-row blocks
        (2, 2560, 1280, (8, 8), 3, 1, 1),  # 128 rows, 23040-long reduction: two chunks and a short third
        (1, 40, 70, (7, 6), 3, 2, 1),  # channels, outputs and rows not multiples of 16 or 32; stride 2
        (3, 96, 20, (5, 3), 3, 1, 1),  # batch 3, a non-square map
        (2, 64, 48, (9, 9), 3, 2, 1),  # a downsampler's shape
        (3, 96, 33, (1, 1), 1, 1, 0),  # a 1x1 convolution of 1x1 maps (the kernel takes it; the rule sends it to oneDNN)
        (1, 8, 16, (3, 5), 3, 1, 0),  # no padding
    ],
)
def test_conv_matches_float64(batch, c, n, side, k, stride, padding):
    g = torch.Generator().manual_seed(c * 100 + n)
    x, w, b = inputs(batch, c, n, side, k, g, torch.channels_last if batch != 3 else torch.contiguous_format)
    want = F.conv2d(x.double(), w.double(), b.double(), stride, padding)
    residual = torch.randn(want.shape, generator=g).bfloat16()
    got = kernel.conv2d(x, kernel.pack(w), b, n, k, stride, padding)
    got_res = kernel.conv2d(x, kernel.pack(w), b, n, k, stride, padding, residual)
    torch_max, torch_mean = errors(F.conv2d(x, w, b.bfloat16(), stride, padding), want)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    largest, mean = errors(got, want)
    assert largest <= max(1.25 * torch_max, 1e-2) and mean <= 1.1 * torch_mean + 1e-4  # rounded once, like torch's bf16
    largest, mean = errors(got_res, want + residual.double())
    assert mean <= 1.1 * torch_mean + 1e-4
    without_bias = kernel.conv2d(x, kernel.pack(w), None, n, k, stride, padding)
    assert errors(without_bias, F.conv2d(x.double(), w.double(), None, stride, padding))[1] <= 1.1 * torch_mean + 1e-4


def test_pack_layout():
    """The packed order, element by element: chunk, pair of 16-column blocks, step, block, k pair,
    column, the pair's two k values (checked on a reduction of three chunks)."""
    n, c = 40, 70  # 2 pairs (padded to 64 columns); 3 steps a tap (96 channels), 9 taps: 27 steps
    w = torch.arange(n * c * 9, dtype=torch.float32).view(n, c, 3, 3)
    saved = kernel.CHUNK
    kernel.CHUNK = 10  # chunks of 10, 10 and 7 steps
    try:
        packed = kernel.pack(w)
    finally:
        kernel.CHUNK = saved
    assert packed.numel() == 64 * 27 * 32
    steps_per_tap = 3
    for col, tap, ch in [(0, 0, 0), (39, 8, 69), (17, 4, 33), (33, 2, 64), (5, 7, 31)]:
        step, kk = tap * steps_per_tap + ch // 32, ch % 32
        chunk, s = step // 10, step % 10
        length = 10 if chunk < 2 else 7
        pair, block, column = col // 32, col // 16 % 2, col % 16
        index = chunk * 10 * 2 * 1024 + ((pair * length + s) * 2 + block) * 512 + (kk // 2) * 32 + column * 2 + kk % 2
        assert packed[index] == w[col, ch, tap // 3, tap % 3]
    assert packed.double().sum() == w.double().sum()  # the padding is zeros: nothing else was added


def test_rules():
    x = torch.zeros(2, 64, 8, 8, dtype=torch.bfloat16)
    w3 = torch.zeros(32, 64, 3, 3, dtype=torch.bfloat16)
    assert kernel.supported_conv(x, w3, (1, 1), (1, 1)) and kernel.pays_conv(x, w3, (1, 1), (1, 1))  # 128 pixels
    assert not kernel.pays_conv(torch.zeros(3, 64, 8, 8, dtype=torch.bfloat16), w3, (1, 1), (1, 1))  # 192 pixels
    assert kernel.pays_conv(torch.zeros(2, 64, 16, 16, dtype=torch.bfloat16), w3, (2, 2), (1, 1))  # strided: 128
    assert not kernel.supported_conv(x.float(), w3.float(), (1, 1), (1, 1))
    assert not kernel.supported_conv(x, w3, (1, 2), (1, 1))
    assert not kernel.supported_conv(x, torch.zeros(32, 64, 3, 1, dtype=torch.bfloat16), (1, 1), (1, 1))
    assert not kernel.supported_conv(x, torch.zeros(32, 32, 3, 3, dtype=torch.bfloat16), (1, 1), (1, 1))  # channels differ
    assert not kernel.pays_conv(x, torch.zeros(32, 64, 1, 1, dtype=torch.bfloat16), (1, 1), (0, 0))  # 1x1: oneDNN


@AMX
def test_dispatch():
    """ops.conv2d runs the kernel for bf16 3x3 convolutions with few output pixels in "auto" mode
    only, and its results are the kernel's."""
    g = torch.Generator().manual_seed(3)
    x, w, b = inputs(2, 64, 48, (8, 8), 3, g)
    b = b.bfloat16()
    residual = torch.randn(2, 48, 8, 8, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), ops.kernels("auto"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "few_rows"
        assert torch.equal(ops.conv2d(x, w, b, (1, 1), (1, 1)), kernel.conv2d(x, kernel.pack(w), b.float(), 48, 3, 1, 1))
        fused = ops.conv2d(x, w, b, (1, 1), (1, 1), residual=residual)
        assert torch.equal(fused, kernel.conv2d(x, kernel.pack(w), b.float(), 48, 3, 1, 1, residual))
        big = torch.randn(2, 64, 16, 16, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        assert ops.conv_path(big, w, (1, 1), (1, 1)) == "packed"  # 512 pixels: oneDNN
        assert ops.conv_path(x.float(), w.float(), (1, 1), (1, 1)) != "few_rows"
        assert ops.conv_path(x, w[:, :, 1:2, 1:2].contiguous(), (1, 1), (0, 0)) != "few_rows"  # 1x1
    w.requires_grad_(True)
    with ops.kernels("auto"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) != "few_rows"  # no backward
    with torch.no_grad(), ops.kernels("torch"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "reference"


@AMX
def test_an_upsampler_with_few_output_pixels_takes_the_kernel():
    """ops.upsample_conv: where the 3x3 convolution at the doubled size has few output pixels it
    upsamples and runs the kernel (not the 4x4 transposed convolution), within bf16 rounding of
    float64; with more pixels it keeps the transposed path."""
    g = torch.Generator().manual_seed(5)
    x, w, b = inputs(2, 64, 48, (4, 4), 3, g)  # 2 x 8 x 8 = 128 output pixels
    b = b.bfloat16()
    want = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), w.double(), b.double(), padding=1)
    with torch.no_grad(), ops.kernels("auto"):
        assert ops.upsample_conv_path(x, w) == "reference"
        got = ops.upsample_conv(x, w, b)
        assert torch.equal(got, kernel.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), kernel.pack(w), b.float(), 48, 3, 1, 1))
        assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()
        more = torch.randn(2, 64, 8, 8, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
        assert ops.upsample_conv_path(more, w) == ("transposed" if ops.PACKED_CONV_TRANSPOSE else "reference")


@AMX
def test_a_changed_weight_is_packed_again():
    """The packed copy follows an in-place change of the weight (a LoRA merge does that)."""
    g = torch.Generator().manual_seed(4)
    x, w, b = inputs(2, 32, 32, (4, 4), 3, g)
    with torch.no_grad(), ops.kernels("auto"):
        before = ops.conv2d(x, w, None, (1, 1), (1, 1))
        w.mul_(2)
        after = ops.conv2d(x, w, None, (1, 1), (1, 1))
    assert torch.allclose(after.float(), 2 * before.float(), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(after.float(), before.float(), rtol=0.1, atol=0.1)


@AMX
def test_a_changed_bias_is_read_again():
    """A bf16 bias reaches the kernel as a kept float32 copy (`ops.fp32_copy`) that follows an
    in-place change of the bias."""
    g = torch.Generator().manual_seed(6)
    x, w, b = inputs(2, 32, 32, (4, 4), 3, g)
    b = b.bfloat16()
    with torch.no_grad(), ops.kernels("auto"):
        assert ops.conv_path(x, w, (1, 1), (1, 1)) == "few_rows"
        before = ops.conv2d(x, w, b, (1, 1), (1, 1))
        b.add_(4)
        after = ops.conv2d(x, w, b, (1, 1), (1, 1))
    assert torch.allclose(after.float(), before.float() + 4, rtol=1e-2, atol=5e-2)


@AMX
@pytest.mark.parametrize("batch", [1, 2])
def test_an_image_gives_the_same_alone_or_in_a_batch(batch):
    """The server pads batches: an image's result must not depend on its batch (same path, same sums)."""
    g = torch.Generator().manual_seed(9)
    x, w, b = inputs(batch + 1, 64, 32, (4, 4), 3, g)
    with torch.no_grad(), ops.kernels("auto"):
        together = ops.conv2d(x, w, b.bfloat16(), (1, 1), (1, 1))
        alone = ops.conv2d(x[1:2], w, b.bfloat16(), (1, 1), (1, 1))
    assert torch.equal(together[1:2], alone)
