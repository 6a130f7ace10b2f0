"""The channels-last GroupNorm (+ SiLU) kernel (fastdiff.kernels.group_norm_cpu) against
F.group_norm in float64, and its dispatch in fastdiff.ops."""

import pytest
import torch
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.kernels import group_norm_cpu

AVX512 = pytest.mark.skipif(not group_norm_cpu.cpu_has_avx512(), reason="this CPU has no AVX-512 with BF16 (the kernel's instructions)")


def reference(x, groups, w, b, eps, silu):
    y = F.group_norm(x.double(), groups, None if w is None else w.double(), None if b is None else b.double(), eps)
    return F.silu(y) if silu else y


def errors(got, want):
    """(largest, mean) |difference| relative to the largest and the mean |reference| value."""
    d = (got.double() - want).abs()
    return (d.max() / want.abs().max()).item(), (d.mean() / want.abs().mean()).item()


@AVX512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize(
    "shape, groups, affine",
    [
        ((1, 48, 5, 7), 16, True),  # 35 pixels: no whole block of 64; 3 channels a group
        ((2, 320, 9, 11), 32, True),  # batch 2, 320 channels: 5 vectors, one chunk of 64 is partial
        ((3, 64, 1, 1), 32, True),  # one pixel, two channels a group: variance from 2 values
        ((1, 512, 16, 16), 32, False),  # no affine parameters
        ((2, 1280, 4, 4), 32, True),
        ((1, 128, 70, 70), 32, True),  # pixels split unevenly between threads
    ],
)
def test_matches_float64(shape, groups, affine, silu, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    C = shape[1]
    w = (torch.randn(C, generator=g) + 1).to(dtype) if affine else None
    b = torch.randn(C, generator=g).to(dtype) if affine else None
    want = reference(x, groups, w, b, 1e-6, silu)
    got = group_norm_cpu.group_norm(x, groups, w, b, 1e-6, silu)
    torch_way = ops.group_norm_ref(x, groups, w, b, 1e-6, silu)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous(memory_format=torch.channels_last)
    got_max, got_mean = errors(got, want)
    torch_max, torch_mean = errors(torch_way, want)
    if dtype == torch.float32:
        assert got_max <= 1e-5
    else:  # bf16's output rounding dominates: no worse than torch's own bf16 GroupNorm
        assert got_max <= max(1.5 * torch_max, 8e-3)
        assert got_mean <= 1.25 * torch_mean + 1e-4


@AVX512
@pytest.mark.parametrize("std", [1e-2, 1e-4])
def test_small_variance_under_a_large_mean(std):
    """A group at 100 +- std: the channel shift keeps the variance from cancelling away; at 1e-4
    the variance (1e-8) is below eps (1e-6), which then dominates."""
    g = torch.Generator().manual_seed(1)
    x = (100 + std * torch.randn(2, 64, 12, 12, generator=g, dtype=torch.float64)).float().contiguous(memory_format=torch.channels_last)
    want = reference(x, 32, None, None, 1e-6, False)
    got = group_norm_cpu.group_norm(x, 32, None, None, 1e-6, False)
    assert errors(got, want)[0] <= 1e-3


@AVX512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_statistics_give_nan_not_a_finite_value(dtype):
    """Values whose squares pass fp32's range (a diverged latent, guidance 1e30) and a NaN: that
    group's output is NaN, as torch's, so the pipeline's non-finite check trips; the other groups
    are normalized as usual."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 64, 6, 6, generator=g)
    x[0, :2] *= 1e30  # group 0
    x[0, 4, 2, 3] = float("nan")  # group 2
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)
    got = group_norm_cpu.group_norm(x, 32, None, None, 1e-6, True)
    assert torch.isnan(got[0, :2]).all() and torch.isnan(got[0, 4:6]).all()
    assert torch.isfinite(got[0, 2:4]).all() and torch.isfinite(got[0, 6:]).all()
    assert not torch.isfinite(ops.group_norm_ref(x, 32, None, None, 1e-6, True)[0, :2]).all()  # torch's too


def test_supported():
    x = torch.zeros(2, 64, 4, 4).contiguous(memory_format=torch.channels_last)
    assert group_norm_cpu.supported(x, 32)
    assert group_norm_cpu.supported(x.bfloat16(), 32)
    assert not group_norm_cpu.supported(torch.zeros(2, 64, 4, 4), 32)  # NCHW: torch's kernel is fine there
    assert not group_norm_cpu.supported(x.half(), 32)
    assert not group_norm_cpu.supported(torch.zeros(2, 40, 4, 4).contiguous(memory_format=torch.channels_last), 8)  # 40 % 16
    assert not group_norm_cpu.supported(x, 48)  # groups must divide the channels
    assert not group_norm_cpu.supported(x[:, :, :, :3], 32)  # not dense


@AVX512
def test_dispatch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    with ops.kernels("auto"):
        assert ops.group_norm_path(x, 32, w) == "cpu"
        assert ops.group_norm_path(x[:1], 32, w) == "cpu"  # the rule does not depend on the batch
        assert ops.group_norm_path(x[:, :, :4, :4].contiguous(memory_format=torch.channels_last), 32, w) == "torch"  # MIN_PIXELS
        assert torch.equal(ops.group_norm(x, 32, w, b, 1e-5, silu=True), group_norm_cpu.group_norm(x, 32, w, b, 1e-5, True))
        assert ops.group_norm_path(x.contiguous(), 32, w) == "torch"
        w.requires_grad_(True)
        assert ops.group_norm_path(x, 32, w) == "torch"  # no backward
    with ops.kernels("torch"):
        assert ops.group_norm_path(x, 32) == "torch"


@AVX512
def test_bf16_affine_is_converted_once_and_again_after_a_change():
    """ops.group_norm hands the kernel float32 copies of a bf16 model's affine parameters, made
    once (`ops.fp32_copy`) and again after an in-place change of the parameter; the result
    matches float64 before and after."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 8, 8, generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    with torch.no_grad(), ops.kernels("auto"):
        assert ops.group_norm_path(x, 32, w) == "cpu"
        copy = ops.fp32_copy(w)
        assert copy.dtype == torch.float32 and ops.fp32_copy(w) is copy and torch.equal(copy, w.float())
        for step in range(2):
            got = ops.group_norm(x, 32, w, b, 1e-5, silu=True)
            assert errors(got, reference(x, 32, w, b, 1e-5, True))[0] < 1e-2, step
            w.mul_(-2)  # in place, as a weight load or merge would
            b.add_(1)
        assert ops.fp32_copy(w) is not copy and torch.equal(ops.fp32_copy(w), w.float())


@pytest.mark.parametrize("side", [4, 8, 12])
def test_an_image_normalizes_the_same_alone_or_in_a_batch(side):
    """Batching (the server pads batches) must not change an image's result: the path and the
    kernel's arithmetic depend on the image, not on the batch size."""
    g = torch.Generator().manual_seed(side)
    x = torch.randn(3, 64, side, side, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    with ops.kernels("auto"):
        batch = ops.group_norm(x, 32, w, b, 1e-5, silu=True)
        alone = ops.group_norm(x[1:2].contiguous(memory_format=torch.channels_last), 32, w, b, 1e-5, silu=True)
    assert torch.equal(batch[1:2], alone)
