"""fastdiff.models against the reference implementations (diffusers, transformers).

Each small model is built by the reference with random weights, perturbed (reference inits zero
some layers), loaded into ours with strict=True (ours built on the meta device and loaded with
assign=True, as the runtime does) and compared on fresh random inputs. The SD1.5-sized models are
compared by key set, shapes and parameter count on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SD15_CLIP, SD15_UNET, SD15_VAE

from fastdiff import ops, precision
from fastdiff.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig

TOL = 1e-5
BF16 = pytest.mark.skipif(not precision.cpu_runs_fast(torch.bfloat16), reason="this CPU has no bf16 instructions (fastdiff.precision)")


@pytest.fixture(autouse=True)
def _torch_reference_ops():
    # The models are compared here; the Triton kernels have their own tests.
    with ops.kernels("torch"):
        yield


def _ours(cls, config, state_dict):
    with torch.device("meta"):
        model = cls(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


def _text_state_dict(ref) -> dict:
    """The SD1.x checkpoint-file layout; transformers >= 5 drops the `text_model.` level in memory."""
    sd = ref.state_dict()
    return sd if all(k.startswith("text_model.") for k in sd) else {"text_model." + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# UNet


@pytest.fixture
def unet_pair(unet_small, perturb, tmp_path):
    from diffusers import UNet2DConditionModel as RefUNet

    torch.manual_seed(0)
    ref = RefUNet(**unet_small).eval()
    perturb(ref, 1)
    ref.save_config(tmp_path)  # a real config.json, with _class_name / _diffusers_version
    cfg = UNetConfig.from_json(tmp_path / "config.json")
    return ref, _ours(UNet2DConditionModel, cfg, ref.state_dict())


@pytest.mark.parametrize(
    "hw, timesteps",
    [
        ((16, 24), [981, 417.5, torch.tensor(3), torch.tensor([999.0, 0.0])]),  # int, float, 0-dim, [B]
        ((13, 22), [torch.tensor(500)]),  # sides not multiples of 4: upsampling to the skip's size
    ],
)
def test_unet_matches_diffusers(unet_pair, hw, timesteps):
    ref, ours = unet_pair
    g = torch.Generator().manual_seed(hw[0])
    x = torch.randn(2, ref.config.in_channels, *hw, generator=g)
    ctx = torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        for t in timesteps:
            want = ref(x, t, ctx).sample
            got = ours(x, t, ctx)
            assert got.shape == want.shape == (2, ref.config.out_channels, *hw)
            assert _maxdiff(got, want) <= TOL, f"timestep {t!r}"


@pytest.mark.parametrize("fp32_linears", ["packed", "F.linear"])
def test_unet_auto_ops_match_diffusers(unet_pair, monkeypatch, fp32_linears):
    """The CPU default ("auto": small convolutions through im2col + GEMM) against diffusers: at
    8x8 every level's output is at most SMALL_CONV_PIXELS, so every convolution takes that path.
    The linears packed (as where packing timed faster) or not; three calls, the text changed in
    the second, so that the text's k and v kept from one call are not served for another text."""
    ref, ours = unet_pair
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, ref.config.in_channels, 8, 8, generator=g)
    contexts = [torch.randn(2, 7, ref.config.cross_attention_dim, generator=g) for _ in range(2)]
    assert 8 * 8 <= ops.SMALL_CONV_PIXELS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the rule as on a 2-thread CPU, whatever this one has
    monkeypatch.setattr(ops, "FP32_PACKED", {})
    monkeypatch.setattr(ops, "FP32_PACKED_MARGIN", 0.0 if fp32_linears == "packed" else float("inf"))
    taken, linear_paths = [], []
    for conv in (m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(lambda m, args: taken.append(ops.conv_path(args[0], m.weight, m.stride, m.padding)))
    for lin in (m for m in ours.modules() if isinstance(m, torch.nn.Linear)):
        lin.register_forward_pre_hook(lambda m, args: linear_paths.append(ops.packed_linear(args[0], m.weight)))
    upsampled = upsample_paths(ours)
    for ctx in (contexts[0], contexts[1], contexts[0]):
        with torch.no_grad(), ops.kernels("auto"):
            got = ours(x, 500, ctx)
        assert _maxdiff(got, ref(x, 500, ctx).sample) <= TOL
    assert taken and "im2col" in taken  # 1x1 convolutions
    assert set(taken) == ({"im2col", "packed"} if ops.PACKED_CONV else {"im2col"})  # no plain F.conv2d
    assert_upsampled_transposed(upsampled)
    assert linear_paths and set(linear_paths) == {ops.PACKED_LINEAR and fp32_linears == "packed"}


def upsample_paths(model) -> list:
    """(path, whether it doubles the size) of each of `model`'s upsampler calls, filled as it runs."""
    from fastdiff.models.common import Upsample2D

    taken = []
    for up in (m for m in model.modules() if isinstance(m, Upsample2D)):
        up.register_forward_pre_hook(
            lambda m, args: taken.append((ops.upsample_conv_path(args[0], m.conv.weight, *args[1:]), ops.upsample_doubles(*args[:2])))
        )
    return taken


def assert_upsampled_transposed(taken: list) -> None:
    """Every doubling upsampler took the transposed convolution (where this torch has it), others not."""
    assert any(doubles for _, doubles in taken)
    for path, doubles in taken:
        assert path == ("transposed" if doubles and ops.PACKED_CONV_TRANSPOSE else "reference")


def group_norm_paths(monkeypatch) -> list:
    """The path of each ops.group_norm call, filled as the model runs."""
    taken = []
    path = ops.group_norm_path
    monkeypatch.setattr(ops, "group_norm_path", lambda *a, **kw: taken.append(path(*a, **kw)) or taken[-1])
    return taken


def assert_group_norm_kernel_ran(taken: list) -> None:
    """The channels-last GroupNorm kernel ran (the packed convolutions' outputs are channels-last)
    where this CPU has it, and torch's elsewhere."""
    from fastdiff.kernels import group_norm_cpu

    assert taken and set(taken) <= {"cpu", "torch"}
    assert ("cpu" in taken) == (group_norm_cpu.library() is not None)


@pytest.mark.parametrize(
    "shape, out_channels, kernel, stride, padding, bias, channels_last",
    [
        ((2, 24, 8, 8), 16, 3, (1, 1), (1, 1), True, False),  # 8x8 out: the largest that qualifies
        ((1, 8, 5, 7), 12, 3, (1, 1), (1, 1), False, True),  # odd sides, no bias, channels-last
        ((2, 16, 9, 9), 16, 3, (2, 2), (0, 0), True, False),  # stride 2, no padding (VAE downsample)
        ((2, 32, 4, 4), 8, 1, (1, 1), (0, 0), True, False),  # 1x1 shortcut
        ((1, 16, 24, 20), 8, 1, (1, 1), (0, 0), True, True),  # 1x1 at a large output
    ],
)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("residual", ["none", "same layout", "other layout"])
def test_conv2d_cpu_paths_match_float64(shape, out_channels, kernel, stride, padding, bias, channels_last, packed, residual, monkeypatch):
    """ops.conv2d's CPU paths ("auto" mode: im2col + GEMM for 1x1 and, without packed oneDNN,
    small outputs; packed oneDNN for the rest) against float64 F.conv2d, then the packed copy
    redone after an in-place change of the weight. With a residual: in the input's layout the
    packed path adds it inside oneDNN's convolution, in the other layout after it."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # any batch fills one thread: the path is taken
    if packed and not ops.PACKED_CONV:
        pytest.skip("this torch has no oneDNN convolution on packed weights (ops.PACKED_CONV)")
    monkeypatch.setattr(ops, "PACKED_CONV", packed)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(out_channels, shape[1], kernel, kernel, generator=g) / (shape[1] * kernel * kernel) ** 0.5
    b = torch.randn(out_channels, generator=g) if bias else None
    out_shape = torch.nn.functional.conv2d(x, w, None, stride, padding).shape
    r = None if residual == "none" else torch.randn(out_shape, generator=g)
    if r is not None and channels_last == (residual == "same layout"):
        r = r.contiguous(memory_format=torch.channels_last)

    def want():
        y = torch.nn.functional.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
        return y if r is None else y + r.double()

    expected_path = "im2col" if kernel == 1 or not packed else "packed"
    with ops.kernels("auto"):
        assert ops.conv_path(x, w, stride, padding) == expected_path  # the path under test
        got = ops.conv2d(x, w, b, stride, padding, r)
        assert got.dtype == torch.float32 and got.shape == want().shape
        assert _maxdiff(got.double(), want()) <= 1e-4 * want().abs().max().item()  # fp32: 1e-4 relative
        with torch.no_grad():
            w.mul_(-0.5)  # in place: a packed copy must follow
        assert _maxdiff(ops.conv2d(x, w, b, stride, padding, r).double(), want()) <= 1e-4 * want().abs().max().item()


def test_conv2d_packed_copy_goes_with_its_weight():
    """A packed copy is dropped when its weight is; inference-mode weights (no version counter to
    notice an in-place change) are never packed."""
    import gc

    if not ops.PACKED_CONV:
        pytest.skip("this torch has no oneDNN convolution on packed weights (ops.PACKED_CONV)")
    x, w = torch.randn(2, 16, 12, 10), torch.randn(24, 16, 3, 3) / 12
    with ops.kernels("auto"), torch.no_grad():
        ops.conv2d(x, w, None, (1, 1), (1, 1))
        before = len(ops._packed)
        del w
        gc.collect()
        assert len(ops._packed) == before - 1
    with torch.inference_mode(), ops.kernels("auto"):
        assert ops.conv_path(x, torch.randn(24, 16, 3, 3), (1, 1), (1, 1)) == "reference"


@BF16
def test_conv2d_packed_path_bf16():
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(2, 16, 12, 10, generator=g), torch.randn(24, 16, 3, 3, generator=g) / 12, torch.randn(24, generator=g)
    r = torch.randn(2, 24, 12, 10, generator=g)
    want = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 1, 1)
    with ops.kernels("auto"), torch.no_grad():
        xb, wb, bb, rb = x.bfloat16(), w.bfloat16(), b.bfloat16(), r.bfloat16()
        assert ops.conv_path(xb, wb, (1, 1), (1, 1)) == "packed"
        got = ops.conv2d(xb, wb, bb, (1, 1), (1, 1))
        fused = ops.conv2d(xb, wb, bb, (1, 1), (1, 1), rb)  # the residual inside oneDNN's convolution
    assert got.dtype == torch.bfloat16 and _maxdiff(got.double(), want) <= 3e-2 * want.abs().max().item()
    want = want + rb.double()
    assert fused.dtype == torch.bfloat16 and _maxdiff(fused.double(), want) <= 3e-2 * want.abs().max().item()


@pytest.mark.parametrize(
    "shape, out_channels, bias, channels_last",
    [
        ((2, 8, 4, 4), 16, True, False),  # batch 2 (CFG), the smallest UNet upsampler input
        ((1, 12, 5, 7), 8, False, True),  # odd sides, no bias, channels-last
        ((3, 16, 9, 6), 16, True, False),  # batch 3, wider than tall
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
def test_upsample_conv_transposed_matches_float64(shape, out_channels, bias, channels_last, dtype):
    """Nearest 2x upsampling + 3x3 convolution as one transposed convolution on a packed 4x4
    kernel, against both ops in float64; and again after the weight changes in place (LoRA)."""
    if not ops.PACKED_CONV_TRANSPOSE:
        pytest.skip("this torch has no oneDNN transposed convolution on packed weights (ops.PACKED_CONV_TRANSPOSE)")
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g)
    w, b = torch.randn(out_channels, shape[1], 3, 3, generator=g) / (3 * shape[1] ** 0.5), (torch.randn(out_channels, generator=g) if bias else None)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2

    def want():
        up = torch.nn.functional.interpolate(x.double(), scale_factor=2.0, mode="nearest")
        return torch.nn.functional.conv2d(up, w.double(), None if b is None else b.double(), padding=1)

    from fastdiff.kernels.attention_cpu import cpu_has_amx
    from fastdiff.kernels.matmul_few_rows_cpu import MAX_CONV_ROWS

    # bf16 on an AMX CPU with at most MAX_CONV_ROWS output pixels: upsampling, then the few-rows
    # kernel (tests/test_matmul_few_rows_cpu.py); the comparisons below hold for both paths
    few = dtype == torch.bfloat16 and cpu_has_amx() and shape[0] * 4 * shape[2] * shape[3] <= MAX_CONV_ROWS
    with ops.kernels("auto"), torch.no_grad():
        assert ops.upsample_conv_path(x, w) == ("reference" if few else "transposed")
        got = ops.upsample_conv(x, w, b)
        assert got.dtype == dtype and got.shape == want().shape == (shape[0], out_channels, 2 * shape[2], 2 * shape[3])
        assert _maxdiff(got.double(), want()) <= tol * want().abs().max().item()
        w.mul_(-0.5)  # in place: the packed kernel must follow
        assert _maxdiff(ops.upsample_conv(x, w, b).double(), want()) <= tol * want().abs().max().item()
        x = torch.randn(shape[0] + 1, shape[1], shape[3] + 3, shape[2], generator=g).to(dtype)  # packed for the first shape
        assert _maxdiff(ops.upsample_conv(x, w, b).double(), want()) <= tol * want().abs().max().item()


def test_upsample_conv_reference_where_not_doubled():
    """Upsampling to a size that is not twice the input (odd latent sides), "torch" mode, and
    inference-mode weights take interpolate + conv2d, as the module was written."""
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(1, 8, 5, 6, generator=g), torch.randn(8, 8, 3, 3, generator=g) / 9, torch.randn(8, generator=g)
    want = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, size=(11, 12), mode="nearest"), w, b, padding=1)
    with ops.kernels("auto"), torch.no_grad():
        assert ops.upsample_conv_path(x, w, (11, 12)) == "reference"
        assert _maxdiff(ops.upsample_conv(x, w, b, (11, 12)), want) <= TOL
        assert ops.upsample_conv_path(x, w, (10, 12)) == ("transposed" if ops.PACKED_CONV_TRANSPOSE else "reference")
    with ops.kernels("torch"), torch.no_grad():
        assert ops.upsample_conv_path(x, w) == "reference"
    with torch.inference_mode(), ops.kernels("auto"):
        assert ops.upsample_conv_path(x, torch.randn(8, 8, 3, 3)) == "reference"


# Packed linears: bf16 always where the CPU has bf16 instructions, fp32 where the packed way
# timed faster (forced here by a margin of 0). Relative tolerance per dtype.
PACKED_DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=BF16)]
REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def fp32_packed(monkeypatch):
    """fp32 linears take the packed path at every shape (each shape still timed once, afresh)."""
    monkeypatch.setattr(ops, "FP32_PACKED", {})
    monkeypatch.setattr(ops, "FP32_PACKED_MARGIN", 0.0)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
@pytest.mark.parametrize("tokens, k, n, bias", [((2, 7), 24, 40, True), ((1, 77), 48, 16, False), ((3,), 16, 33, True)])
def test_linear_packed_path_matches_float64(tokens, k, n, bias, dtype, fp32_packed):
    """ops.linear on a packed weight against float64 F.linear: with and without a residual
    (a post-op of the matmul), at another token count than the one it was packed for, and after
    an in-place change of the weight (the packed copy must follow)."""
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(*tokens, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    r = torch.randn(*tokens, n, generator=g).to(dtype)

    def check(x, residual):
        want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        want = want if residual is None else want + residual.double()
        got = ops.linear(x, w, b, residual)
        assert got.dtype == dtype and got.shape == want.shape
        assert _maxdiff(got.double(), want) <= REL[dtype] * want.abs().max().item()

    with ops.kernels("auto"), torch.no_grad():
        assert ops.packed_linear(x, w)  # the path under test
        check(x, None)
        check(x, r)
        more = torch.randn(5, *tokens, k, generator=g).to(dtype)  # 5x the tokens it was packed for
        check(more, None)
        w.mul_(-0.5)
        check(x, r)


def test_faster_layout_takes_the_one_token_layout_only_by_the_margin():
    """The median round decides (one slow round does not), and a near tie keeps the tokens' own
    layout."""
    assert ops.faster_layout(512, {512: [2.0, 2.1, 9.0, 1.9, 2.0], 1: [1.0, 1.0, 1.0, 5.0, 1.0]}) == 1
    assert ops.faster_layout(512, {512: [1.0, 1.0, 9.0, 1.0, 1.0], 1: [1.2, 1.2, 1.0, 1.2, 1.2]}) == 512
    margin = ops.LAYOUT_MARGIN
    assert ops.faster_layout(64, {64: [0.99 * margin] * 3, 1: [1.0] * 3}) == 64
    assert ops.faster_layout(64, {64: [1.01 * margin] * 3, 1: [1.0] * 3}) == 1


def test_packed_faster_only_by_the_margin_in_the_median_round():
    """One slow round does not decide, and a near tie keeps F.linear."""
    assert ops.packed_faster({"F.linear": [2.0, 9.0, 2.0], "packed": [1.0, 1.0, 5.0]})
    assert not ops.packed_faster({"F.linear": [1.0, 9.0, 1.0], "packed": [1.0, 1.0, 1.0]})
    margin = ops.FP32_PACKED_MARGIN
    assert not ops.packed_faster({"F.linear": [0.99 * margin] * 3, "packed": [1.0] * 3})
    assert ops.packed_faster({"F.linear": [1.01 * margin] * 3, "packed": [1.0] * 3})


def test_time_calls_interleaves_the_ways_and_lengthens_short_rounds():
    """One untimed call each, then rounds alternating the ways; a call far under `min_seconds`
    runs many times a round (one call of a few microseconds alone is mostly timer noise)."""
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    seconds = ops.time_calls(calls, rounds=3, min_seconds=1e-3)
    assert order[:2] == ["a", "b"] and {k: len(v) for k, v in seconds.items()} == {"a": 3, "b": 3}
    repeat = (len(order) - 2) // 6
    assert repeat > 10 and order[2:] == (["a"] * repeat + ["b"] * repeat) * 3
    order.clear()
    ops.time_calls(calls, rounds=2, repeat=2)
    assert order == ["a", "b"] + ["a", "a", "b", "b"] * 2
    order.clear()
    ops.time_calls(calls, rounds=2, warm=False)  # testing.interleaved_medians: the callers warm up
    assert order == ["a", "b"] * 2
    order.clear()
    seen = []
    seconds = ops.time_calls(calls, rounds=5, settled=lambda s: seen.append(len(s["a"])) or len(s["a"]) == 2)
    assert seen == [1, 2] and len(seconds["a"]) == len(seconds["b"]) == 2 and len(order) == 2 + 2 * 2


def test_packing_clear_only_when_every_round_is_far_past_the_margin():
    """The fp32 timing stops early only on two rounds or more that all say the same, by
    FP32_PACKED_CLEAR."""
    high = ops.FP32_PACKED_MARGIN * ops.FP32_PACKED_CLEAR
    assert ops.packing_clear({"F.linear": [1.01 * high] * 2, "packed": [1.0] * 2})
    assert ops.packing_clear({"F.linear": [1.0] * 2, "packed": [1.01 * ops.FP32_PACKED_CLEAR / ops.FP32_PACKED_MARGIN] * 2})
    assert not ops.packing_clear({"F.linear": [3.0], "packed": [1.0]})  # one round: maybe a spike
    assert not ops.packing_clear({"F.linear": [1.01 * high, 0.99 * high], "packed": [1.0, 1.0]})  # past the margin, not clearly
    assert not ops.packing_clear({"F.linear": [3.0, 1.0], "packed": [1.0, 3.0]})  # rounds disagree


def test_fp32_linears_pack_by_the_timing_of_each_shape(monkeypatch):
    """Each fp32 matmul shape is timed once (tokens, K, the rows run as one matmul, threads) on
    the two ways at that shape, and its verdict followed: a linear by its rows, linears of one
    input by their summed rows."""
    monkeypatch.setattr(ops, "FP32_PACKED", {})
    timed = []  # (tokens, N) of each timing
    verdict = {}  # N -> whether packing is to time faster

    def fake_time_calls(calls, rounds, repeat=1, min_seconds=0.0, settled=None):
        plain, packed = calls["F.linear"](), calls["packed"]()  # the two ways, at the shape asked
        assert plain.shape == packed.shape and torch.allclose(plain, packed)
        timed.append(tuple(plain.shape))
        return {"F.linear": [1.0] * rounds, "packed": [0.5 if verdict[plain.shape[1]] else 2.0] * rounds}

    monkeypatch.setattr(ops, "time_calls", fake_time_calls)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 8, generator=g)  # 10 tokens
    ws = tuple(torch.randn(n, 8, generator=g) for n in (6, 6, 4))
    verdict.update({6: False, 16: True})
    with ops.kernels("auto"), torch.no_grad():
        assert not ops.packed_linear(x, ws[0])  # 6 rows: timed slower packed
        assert not ops.packed_linear(x, ws[1])  # the same shape: not timed again
        outs = ops.linear_split(x, ws, (None, None, None))  # q, k, v as one matmul of 16 rows: packed
        assert ops.packed_linear(x, ws[2], 16)
    assert timed == [(10, 6), (10, 16)]
    assert set(ops.FP32_PACKED) == {(10, 8, 6, torch.get_num_threads()), (10, 8, 16, torch.get_num_threads())}
    for o, w in zip(outs, ws):
        want = torch.nn.functional.linear(x.double(), w.double())
        assert _maxdiff(o.double(), want) <= 1e-5 * want.abs().max().item()


@BF16
@pytest.mark.parametrize("margin, layout", [(0.0, "one-token"), (float("inf"), "own")])
def test_linear_packs_in_the_timed_layout(monkeypatch, margin, layout):
    """ops.linear packs the weight in the layout `linear_layout` picked (bit for bit oneDNN on
    that layout: the two layouts sum in different orders), records the pick per shape, and stays
    within bf16 rounding of float64 either way, with a residual and for another token count."""
    monkeypatch.setattr(ops, "LINEAR_LAYOUT", {})
    monkeypatch.setattr(ops, "LAYOUT_MARGIN", margin)  # 0: the one-token layout always wins; inf: never
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 256, 640, generator=g).bfloat16()  # [B, tokens, K]
    w = (torch.randn(640, 640, generator=g) / 640**0.5).bfloat16()
    b, r = torch.randn(640, generator=g).bfloat16(), torch.randn(2, 256, 640, generator=g).bfloat16()
    hint = 1 if layout == "one-token" else 512
    with ops.kernels("auto"), torch.no_grad():
        got = ops.linear(x, w, b, r)
        assert list(ops.LINEAR_LAYOUT) == [(512, 640, 640, torch.bfloat16, torch.get_num_threads())]
        assert ops.LINEAR_LAYOUT[512, 640, 640, torch.bfloat16, torch.get_num_threads()][0] == hint
        direct = torch.ops.mkldnn._linear_pointwise.binary(x.reshape(512, 640), r.reshape(512, 640), torch.ops.mkldnn._reorder_linear_weight(w, hint), b, "add")
        assert torch.equal(got.reshape(512, 640), direct)
        want = torch.nn.functional.linear(x.double(), w.double(), b.double()) + r.double()
        assert _maxdiff(got.double(), want) <= 1e-2 * want.abs().max().item()
        few = x[:1, :3]  # 3 tokens on the copy packed for 512
        want = torch.nn.functional.linear(few.double(), w.double(), b.double())
        assert _maxdiff(ops.linear(few, w, b).double(), want) <= 1e-2 * want.abs().max().item()


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_split_packed_together_matches_float64(dtype, fp32_packed):
    """ops.linear_split (weights packed as one, the output split into views) against float64
    F.linear per weight: widths not multiples of 16, a bias on some weights only, 3-d input; then
    after an in-place change of one weight (the joint copy must follow)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 37, 48, generator=g).to(dtype)
    ws = [(torch.randn(n, 48, generator=g) / 48**0.5).to(dtype) for n in (40, 24, 33)]
    bs = [torch.randn(40, generator=g).to(dtype), None, torch.randn(33, generator=g).to(dtype)]

    def check(outs):
        assert len(outs) == 3
        for out, w, b in zip(outs, ws, bs):
            want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
            assert out.dtype == dtype and out.shape == want.shape
            assert _maxdiff(out.double(), want) <= REL[dtype] * want.abs().max().item()

    with ops.kernels("auto"), torch.no_grad():
        assert ops.packed_linear(x, ws[0])
        check(ops.linear_split(x, tuple(ws), tuple(bs)))
        ws[1].mul_(-2.0)
        check(ops.linear_split(x, tuple(ws), tuple(bs)))
        with ops.kernels("torch"):  # off the packed path: F.linear itself
            outs = ops.linear_split(x, tuple(ws), tuple(bs))
            assert all(torch.equal(o, torch.nn.functional.linear(x, w, b)) for o, w, b in zip(outs, ws, bs))


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_split_reuses_only_an_equal_input_and_unchanged_weights(dtype, fp32_packed):
    """With reuse, the same input or an equal one (another tensor) gets the kept outputs back; a
    different input, the same one changed in place, or any after a weight changed in place, gets
    fresh ones, correct against float64."""
    g = torch.Generator().manual_seed(12)
    ctx = torch.randn(2, 77, 64, generator=g).to(dtype)
    ws = tuple((torch.randn(n, 64, generator=g) / 8).to(dtype) for n in (32, 32))
    bs = (None, None)

    def want(c):
        return [torch.nn.functional.linear(c.double(), w.double()) for w in ws]

    with ops.kernels("auto"), torch.no_grad():
        first = ops.linear_split(ctx, ws, bs, reuse=True)
        again = ops.linear_split(ctx.clone(), ws, bs, reuse=True)
        assert all(a is b for a, b in zip(first, again))
        other = ctx.clone()
        other[1, 5, 7] += 1.0
        for c in (other, ctx):
            outs = ops.linear_split(c, ws, bs, reuse=True)
            assert all(_maxdiff(o.double(), r) <= REL[dtype] * r.abs().max().item() for o, r in zip(outs, want(c)))
        ws[0].mul_(-1.0)
        outs = ops.linear_split(ctx, ws, bs, reuse=True)
        assert outs[0] is not first[0]
        assert all(_maxdiff(o.double(), r) <= REL[dtype] * r.abs().max().item() for o, r in zip(outs, want(ctx)))
        assert ops.linear_split(ctx, ws, bs, reuse=True)[0] is outs[0]  # the same tensor, unchanged
        ctx[0, 3, 2] -= 2.0  # the same tensor, changed in place
        outs = ops.linear_split(ctx, ws, bs, reuse=True)
        assert all(_maxdiff(o.double(), r) <= REL[dtype] * r.abs().max().item() for o, r in zip(outs, want(ctx)))


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_split_reuse_takes_inference_tensors(dtype, fp32_packed):
    """The backends run under inference mode, where `context.to(dtype)` makes an inference tensor,
    which has no version counter: reuse must still work (by value), and an in-place change to the
    same tensor must still give fresh outputs."""
    g = torch.Generator().manual_seed(13)
    ws = tuple((torch.randn(n, 64, generator=g) / 8).to(dtype) for n in (32, 16))
    ctx32 = torch.randn(2, 77, 64, generator=g)

    def want(c):
        return [torch.nn.functional.linear(c.double(), w.double()) for w in ws]

    with ops.kernels("auto"), torch.inference_mode():
        ctx = ctx32.to(dtype) if dtype != torch.float32 else ctx32.clone()
        assert ctx.is_inference()
        first = ops.linear_split(ctx, ws, (None, None), reuse=True)
        assert all(a is b for a, b in zip(first, ops.linear_split(ctx, ws, (None, None), reuse=True)))
        ctx[1, 4, 9] += 3.0  # in place: no version to see it, the values do
        outs = ops.linear_split(ctx, ws, (None, None), reuse=True)
        assert outs[0] is not first[0]
        assert all(_maxdiff(o.double(), r) <= REL[dtype] * r.abs().max().item() for o, r in zip(outs, want(ctx)))


def test_copies_of_an_inference_tensor_are_made_afresh():
    """`ops.fp32_copy` (biases and norm affines the CPU kernels read in float32) of an inference
    tensor, which has no version to follow: the values of now, also after an in-place change."""
    with torch.inference_mode():
        w = torch.randn(64, generator=torch.Generator().manual_seed(14)).bfloat16()
        assert torch.equal(ops.fp32_copy(w), w.float())
        w.mul_(-3)
        assert torch.equal(ops.fp32_copy(w), w.float())


@BF16
def test_backend_loaded_and_called_in_inference_mode(tmp_path):
    """The torch backend built and called inside torch.inference_mode on a bf16 CPU, its context
    given in float32 (cast inside the call: an inference tensor), gives what the backend built
    outside gives: the packed weights, the kept text k/v and the kernels' float32 copies must not
    read a version that inference tensors do not have."""
    from fastdiff.backends import make_backend
    from fastdiff import iospec, testing
    from fastdiff.weights import read_configs

    root = testing.build_random_folder(tmp_path / "m", "tiny", seed=3)
    g = torch.Generator().manual_seed(15)
    args = iospec.call_inputs(iospec.UNET, read_configs(root), height=64, width=64, generator=g)
    want = make_backend("torch", root, device=torch.device("cpu"), dtype=torch.bfloat16, kernels="auto").unet(*args)
    with torch.inference_mode():
        net = make_backend("torch", root, device=torch.device("cpu"), dtype=torch.bfloat16, kernels="auto")
        for _ in range(2):  # the second call takes the kept k/v
            assert torch.equal(net.unet(*args), want)


@pytest.mark.parametrize("dtype", PACKED_DTYPES)
def test_linear_geglu_packed_path_matches_float64(dtype, fp32_packed):
    """ops.linear_geglu (two matmuls, gelu and the product as post-ops) against float64
    geglu(F.linear(...)), then after an in-place change of the weight."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 32, generator=g).to(dtype)
    w, b = (torch.randn(2 * 24, 32, generator=g) / 32**0.5).to(dtype), torch.randn(2 * 24, generator=g).to(dtype)

    def want():
        return ops.geglu_ref(torch.nn.functional.linear(x.double(), w.double(), b.double()))

    with ops.kernels("auto"), torch.no_grad():
        assert ops.packed_linear(x, w)
        got = ops.linear_geglu(x, w, b)
        assert got.shape == (2, 9, 24) and _maxdiff(got.double(), want()) <= REL[dtype] * want().abs().max().item()
        w[:24].mul_(-1.0)  # the value half only: both halves' copies are redone
        assert _maxdiff(ops.linear_geglu(x, w, b).double(), want()) <= REL[dtype] * want().abs().max().item()


def test_linear_off_the_packed_path_is_f_linear(monkeypatch):
    """fp32 where packing did not time faster, "torch" mode and inference-mode weights keep
    F.linear (plus the residual) exactly."""
    monkeypatch.setattr(ops, "FP32_PACKED", {})
    monkeypatch.setattr(ops, "FP32_PACKED_MARGIN", float("inf"))  # packing never pays
    g = torch.Generator().manual_seed(4)
    x, w, b, r = torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6, generator=g), torch.randn(2, 5, 6, generator=g)
    with ops.kernels("auto"), torch.no_grad():
        assert not ops.packed_linear(x, w)
        assert torch.equal(ops.linear(x, w, b, r), torch.nn.functional.linear(x, w, b) + r)
        assert torch.equal(ops.linear_geglu(x, torch.cat([w, w]), torch.cat([b, b])), ops.geglu_ref(torch.nn.functional.linear(x, torch.cat([w, w]), torch.cat([b, b]))))
    monkeypatch.setattr(ops, "FP32_PACKED", {})  # timed afresh, and packing always pays; these still keep F.linear:
    monkeypatch.setattr(ops, "FP32_PACKED_MARGIN", 0.0)
    xb, wb = x.bfloat16(), w.bfloat16()
    with ops.kernels("torch"), torch.no_grad():
        assert not ops.packed_linear(xb, wb) and not ops.packed_linear(x, w)
    with ops.kernels("auto"), torch.inference_mode():
        assert not ops.packed_linear(xb, torch.randn(6, 8).bfloat16()) and not ops.packed_linear(x, torch.randn(6, 8))
    with ops.kernels("auto"):  # autograd wants a gradient through the weight
        assert not ops.packed_linear(x, w.clone().requires_grad_())
    with ops.kernels("auto"), torch.no_grad():
        assert ops.packed_linear(x, w) and not ops.packed_linear(x[:0], w)  # no tokens: F.linear


def test_conv2d_im2col_path_only_where_measured(monkeypatch):
    """Without packed oneDNN: 3x3 outputs over SMALL_CONV_PIXELS, other modes and dtypes than
    fp32 keep F.conv2d. With it, it takes every 3x3 (it beat im2col at SD's small outputs)."""
    w = torch.randn(4, 4, 3, 3)
    if ops.PACKED_CONV:
        with ops.kernels("auto"):
            assert ops.conv_path(torch.randn(1, 4, 8, 8), w, (1, 1), (1, 1)) == "packed"
    monkeypatch.setattr(ops, "PACKED_CONV", False)
    small, large = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 9, 8)  # 64 and 72 output pixels
    with ops.kernels("auto"):
        assert ops.im2col_conv(small, w, (1, 1), (1, 1))
        assert not ops.im2col_conv(large, w, (1, 1), (1, 1))
        assert ops.im2col_conv(torch.randn(1, 4, 16, 16), w, (2, 2), (1, 1))  # 8x8 after stride 2
        assert not ops.im2col_conv(small.double(), w.double(), (1, 1), (1, 1))
        assert ops.im2col_conv(torch.randn(1, 4, 64, 64), torch.randn(4, 4, 1, 1), (1, 1), (0, 0))  # any 1x1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not ops.im2col_conv(small, w, (1, 1), (1, 1))
        assert not ops.im2col_conv(small.to("meta"), w.to("meta"), (1, 1), (1, 1))  # CPU only
    for mode in ("torch", "triton"):
        with ops.kernels(mode):
            assert not ops.im2col_conv(small, w, (1, 1), (1, 1))


def test_conv2d_im2col_path_needs_a_batch_that_fills_the_threads(monkeypatch):
    """ATen's im2col conv runs one image per thread: taken for batch 1 or a multiple of the
    thread count, not for a batch that would leave threads idle."""
    w = torch.randn(4, 4, 1, 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    with ops.kernels("auto"):
        taken = {b: ops.im2col_conv(torch.randn(b, 4, 8, 8), w, (1, 1), (0, 0)) for b in (1, 2, 3, 4, 8)}
    assert taken == {1: True, 2: False, 3: False, 4: True, 8: True}


class _PathProbe(torch.nn.Module):
    """Records which way `ops.conv2d` and `ops.group_norm` would run inside its own forward."""

    def __init__(self, paths: list):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3), requires_grad=False)
        self.paths = paths  # not the module's state: torch.export runs the forward on a copy

    def forward(self, x):
        self.paths.append((ops.conv_path(x, self.weight, (1, 1), (1, 1)), ops.group_norm_path(x, 4, None), ops.tracing()))
        return ops.conv2d(x, self.weight, None, (1, 1), (1, 1))


@pytest.mark.filterwarnings("ignore")  # the exporters' own notices
@pytest.mark.parametrize("tracer", ["jit.trace", "torch.export", "onnx dynamo", "onnx torchscript"])
def test_tracers_and_exporters_see_the_reference_ops(tracer, tmp_path):
    """In "auto" mode every way torch traces a forward makes `ops.tracing()` true, so no packed
    oneDNN call or C kernel ends up in a graph: `ops.tracing` asks torch's tracing and compiling
    flags only, which both ONNX exporters raise (the dynamo one through torch.export)."""
    paths: list = []
    probe, x = _PathProbe(paths), torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    run = {
        "jit.trace": lambda: torch.jit.trace(probe, (x,), check_trace=False),
        "torch.export": lambda: torch.export.export(probe, (x,), strict=False),
        "onnx dynamo": lambda: torch.onnx.export(probe, (x,), tmp_path / "m.onnx", dynamo=True, verbose=False),
        "onnx torchscript": lambda: torch.onnx.export(probe, (x,), tmp_path / "m.onnx", dynamo=False),
    }[tracer]
    with ops.kernels("auto"), torch.no_grad():
        probe(x)
        eager = paths.pop()
        run()
    if ops.PACKED_CONV:
        assert eager[0] == "packed" and not eager[2], eager  # else the check below would pass for nothing
    assert paths and all(p == ("reference", "torch", True) for p in paths), paths


def test_unet_fp16_close_to_fp32(unet_pair):
    _, ours = unet_pair
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, ours.config.in_channels, 8, 8, generator=g), torch.randn(2, 7, ours.config.context_dims[0], generator=g)
    with torch.no_grad():
        want = ours(x, 500, ctx)
        got = ours.half()(x.half(), torch.tensor(500), ctx.half())
    assert got.dtype == torch.float16
    assert _maxdiff(got.float(), want) <= 0.01 * want.abs().max().item()


@BF16
def test_unet_bf16_packed_paths_close_to_diffusers(unet_pair, monkeypatch):
    """The CPU default on a bf16 CPU: every linear on a packed weight (residual adds and GEGLU as
    post-ops), convolutions packed or im2col, attention and the convolutions with few output
    pixels in the C kernels where the CPU has their instructions (attention: AVX512-BF16; few
    pixels: AMX; Winograd 3x3 convolutions: AVX512-BF16 without AMX), against diffusers in fp32
    at bf16's tolerance."""
    from fastdiff.kernels import attention_cpu, winograd_cpu

    monkeypatch.setattr(winograd_cpu, "MIN_MULTIPLY_ADDS", 0)  # these convolutions are far smaller than SD1.5's
    ref, ours = unet_pair
    attention_paths = []  # (path taken, the path the kernel's rules call for)
    path = ops.attention_path
    kernel, amx = attention_cpu.library() is not None, attention_cpu.cpu_has_amx()

    def record(q, k, v, causal=False):
        attention_paths.append((path(q, k, v, causal), "cpu" if kernel and attention_cpu.pays(q, k) else "torch"))
        return attention_paths[-1][0]

    monkeypatch.setattr(ops, "attention_path", record)
    normed = group_norm_paths(monkeypatch)
    conv_paths = []
    conv_path = ops.conv_path
    monkeypatch.setattr(ops, "conv_path", lambda *a: conv_paths.append(conv_path(*a)) or conv_paths[-1])
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, ref.config.in_channels, 12, 10, generator=g), torch.randn(2, 7, ref.config.cross_attention_dim, generator=g)
    ours = ours.bfloat16()
    taken = []
    for lin in (m for m in ours.modules() if isinstance(m, torch.nn.Linear)):
        lin.register_forward_pre_hook(lambda m, args: taken.append(ops.packed_linear(args[0], m.weight)))
    upsampled = upsample_paths(ours)
    with torch.no_grad():
        want = ref(x, 500, ctx).sample
        with ops.kernels("auto"):
            got = ours(x.bfloat16(), torch.tensor(500), ctx.bfloat16())
    assert taken and all(taken)  # the GEGLU projections do not call their Linear's forward
    assert_upsampled_transposed(upsampled)
    assert attention_paths and all(taken == wanted for taken, wanted in attention_paths)
    assert not kernel or ("cpu", "cpu") in attention_paths
    assert_group_norm_kernel_ran(normed)
    assert "packed" in conv_paths and (not amx or "few_rows" in conv_paths)  # 120 pixels and more, 30 and fewer
    assert not winograd_cpu.cpu_can_run() or "winograd" in conv_paths  # the 3x3 ones at 120 pixels
    assert got.dtype == torch.bfloat16
    assert _maxdiff(got.double(), want.double()) <= 3e-2 * want.abs().max().item()


def test_unet_config_reads_diffusers_fields():
    cfg = UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", **SD15_UNET, "dropout": 0.0})
    assert cfg == UNetConfig()  # the defaults are SD1.5's
    assert cfg.heads == (8, 8, 8, 8)  # attention_head_dim means heads in SD1.x configs
    assert UNetConfig.from_dict({**SD15_UNET, "num_attention_heads": [5, 10, 20, 20]}).heads == (5, 10, 20, 20)


@pytest.mark.parametrize(
    "change",
    [
        {"class_embed_type": "timestep"},
        {"addition_embed_type": "text_time"},
        {"down_block_types": ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
        {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"]},
        {"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"},
        {"transformer_layers_per_block": [1, 2, 10, 1]},
        {"time_cond_proj_dim": 256},
        {"act_fn": "gelu"},
        {"attention_head_dim": 7},
    ],
)
def test_unet_config_rejects_unsupported(change):
    with pytest.raises(ValueError):
        UNetConfig.from_dict({**SD15_UNET, **change})


# ----------------------------------------------------------------------------------------------
# VAE


def test_vae_matches_diffusers(vae_small, perturb, tmp_path):
    from diffusers import AutoencoderKL as RefVAE

    torch.manual_seed(0)
    ref = RefVAE(**vae_small).eval()
    perturb(ref, 2)
    ref.save_config(tmp_path)
    ours = _ours(AutoencoderKL, VAEConfig.from_json(tmp_path / "config.json"), ref.state_dict())
    assert ours.config.scaling_factor == ref.config.scaling_factor

    g = torch.Generator().manual_seed(3)
    f = 2 ** (len(vae_small["block_out_channels"]) - 1)  # pixels per latent
    z = torch.randn(2, 4, 6, 10, generator=g)
    img = torch.randn(2, 3, 6 * f, 10 * f, generator=g)
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode(z)
        assert got.shape == want.shape == (2, 3, 6 * f, 10 * f)
        assert _maxdiff(got, want) <= TOL

        dist = ref.encode(img).latent_dist
        mean, logvar = ours.encode(img)
        assert mean.shape == dist.mean.shape == (2, 4, 6, 10)
        assert _maxdiff(mean, dist.mean) <= TOL
        assert _maxdiff(logvar, dist.logvar) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
def test_vae_decode_auto_ops_match_diffusers(vae_small, perturb, tmp_path, dtype, monkeypatch):
    """The CPU default's decode (packed convolutions, upsamplers as transposed convolutions)
    against diffusers in fp32, at odd latent sides and batch 2."""
    from diffusers import AutoencoderKL as RefVAE

    torch.manual_seed(0)
    ref = RefVAE(**vae_small).eval()
    perturb(ref, 2)
    ref.save_config(tmp_path)
    ours = _ours(AutoencoderKL, VAEConfig.from_json(tmp_path / "config.json"), ref.state_dict()).to(dtype)
    upsampled = upsample_paths(ours)
    normed = group_norm_paths(monkeypatch)
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ops.kernels("auto"):
        want = ref.decode(z).sample
        got = ours.decode(z.to(dtype))
    assert_upsampled_transposed(upsampled)
    assert_group_norm_kernel_ran(normed)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _maxdiff(got.double(), want.double()) <= tol * want.abs().max().item()


def test_vae_config_rejects_unsupported():
    with pytest.raises(ValueError):
        VAEConfig.from_dict({**SD15_VAE, "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError):
        VAEConfig.from_dict({**SD15_VAE, "use_quant_conv": False})
    assert VAEConfig.from_dict({"_class_name": "AutoencoderKL", **SD15_VAE}) == VAEConfig()


# ----------------------------------------------------------------------------------------------
# CLIP text encoder


def _token_ids(cfg: dict, batch: int, n: int, g: torch.Generator) -> torch.Tensor:
    """bos, random words, eos, then padding (eos again when pad == eos), like the tokenizer."""
    ids = torch.randint(3, cfg["vocab_size"] - 1, (batch, n), generator=g)
    ids[ids == cfg["eos_token_id"]] += 1  # words are never eos
    ids[:, 0] = cfg["bos_token_id"]
    for b, end in enumerate(torch.randint(2, n - 1, (batch,), generator=g).tolist()):
        eos = cfg["vocab_size"] - 1 if cfg["eos_token_id"] == 2 else cfg["eos_token_id"]  # legacy: EOT is the top id
        ids[b, end] = eos
        ids[b, end + 1 :] = cfg["pad_token_id"]
    return ids


@pytest.mark.parametrize("mode", ["torch", "auto, fp32 linears packed"])
def test_clip_matches_transformers(clip_small, perturb, tmp_path, mode, monkeypatch):
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefCLIP

    monkeypatch.setattr(ops, "FP32_PACKED", {})
    monkeypatch.setattr(ops, "FP32_PACKED_MARGIN", 0.0)  # in "auto": q, k and v as one packed matmul, out_proj and fc2 with the residual fused

    torch.manual_seed(0)
    ref = RefCLIP(RefConfig(**clip_small)).eval()
    perturb(ref, 3)
    ref.config.to_json_file(tmp_path / "config.json")
    cfg = CLIPTextConfig.from_json(tmp_path / "config.json")
    assert cfg.eos_token_id == clip_small["eos_token_id"]
    ours = _ours(CLIPTextModel, cfg, ref.state_dict())  # the installed transformers' own layout

    ids = _token_ids(clip_small, 3, 16, torch.Generator().manual_seed(4))
    with torch.no_grad(), ops.kernels(mode.split(",")[0]):
        want = ref(input_ids=ids)
        hidden, pooled = ours(ids)
    assert bool(ops.FP32_PACKED) == (mode != "torch" and ops.PACKED_LINEAR)
    assert hidden.shape == want.last_hidden_state.shape == (3, 16, clip_small["hidden_size"])
    assert _maxdiff(hidden, want.last_hidden_state) <= TOL
    assert _maxdiff(pooled, want.pooler_output) <= TOL


def test_clip_loads_sd15_file_layout():
    """SD1.5's text encoder file: keys under `text_model.`, plus the obsolete position_ids."""
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefCLIP

    cfg = dict(SD15_CLIP, vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    ref = RefCLIP(RefConfig(**cfg)).eval()
    sd = _text_state_dict(ref)
    sd["text_model.embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]
    ours = _ours(CLIPTextModel, CLIPTextConfig.from_dict(cfg), sd)
    ids = _token_ids(cfg, 2, 77, torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _maxdiff(ours(ids)[0], ref(input_ids=ids).last_hidden_state) <= TOL


# ----------------------------------------------------------------------------------------------
# SD1.5-sized networks on the meta device: exactly the reference's keys and shapes


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_sd15_unet_keys_and_shapes():
    from diffusers import UNet2DConditionModel as RefUNet

    with torch.device("meta"):
        ref = RefUNet(**SD15_UNET)
        ours = UNet2DConditionModel(UNetConfig.from_dict(SD15_UNET))
    assert _shapes(ours) == _shapes(ref)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert 855e6 < n < 865e6  # SD1.5's UNet: ~860M parameters


def test_sd15_vae_keys_and_shapes():
    from diffusers import AutoencoderKL as RefVAE

    with torch.device("meta"):
        ref = RefVAE(**SD15_VAE)
        ours = AutoencoderKL(VAEConfig.from_dict(SD15_VAE))
    assert _shapes(ours) == _shapes(ref)


def test_sd15_clip_keys_and_shapes():
    from transformers import CLIPTextConfig as RefConfig
    from transformers import CLIPTextModel as RefCLIP

    with torch.device("meta"):
        ref = RefCLIP(RefConfig(**SD15_CLIP))
        ours = CLIPTextModel(CLIPTextConfig.from_dict(SD15_CLIP))
    assert _shapes(ours) == {k: tuple(v.shape) for k, v in _text_state_dict(ref).items()}
    assert "text_model.final_layer_norm.weight" in _shapes(ours)


def test_models_have_no_buffers():
    """Buffers made in __init__ would stay on the meta device after load_state_dict(assign=True)."""
    with torch.device("meta"):
        models = [UNet2DConditionModel(UNetConfig()), AutoencoderKL(VAEConfig()), CLIPTextModel(CLIPTextConfig())]
    assert all(not list(m.buffers()) for m in models)
