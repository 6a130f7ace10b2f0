"""fastdiff.schedulers vs diffusers' schedulers, whole sampling loops in float64.

The "model" is a fixed random function of (sample, t): 0.1 * x + sin(t / 97) * R with a fixed
standard normal R, fed to both loops. Each loop runs on its own outputs (no teacher forcing), so
every step's prev_sample and every scaled model input must agree along the whole trajectory.

Tolerance: |ours - diffusers| <= TOL * (the largest |sample| the loop has held so far, at least 1),
TOL = 2e-6. diffusers keeps its schedule tables in float32 and computes some steps in float32
(Euler and DPM-Solver cast the sample to float32; DPM-Solver takes lambda differences in float32),
so float32 rounding of the largest sample seen is the precision the reference carries (with
zero-terminal-SNR Euler, sigma_max = 4096, that error dwarfs the later, small samples); we compute
the coefficients in float64.
"""

import dataclasses
import json
import math

import diffusers
import pytest

from fastdiff import sd15
import torch
from diffusers.utils.torch_utils import randn_tensor

from fastdiff import schedulers
from fastdiff.schedulers import SCHEDULERS, SchedulerConfig, make_scheduler

# diffusers' schedulers call np.array(tensor) in a way numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 2e-6

SD15 = sd15.SD15_SCHEDULER
# v-prediction, leading spacing for every class (Euler's init_noise_sigma takes its other branch).
VPRED = dict(SD15, prediction_type="v_prediction", timestep_spacing="leading")
# Linear betas, trailing spacing, alpha_bar_prev = 1 at the end.
LINEAR_TRAILING = dict(
    SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="trailing", steps_offset=0,
    set_alpha_to_one=True,
)  # fmt: skip
CONFIGS = {"sd15": SD15, "vpred": VPRED, "linear_trailing": LINEAR_TRAILING}

STEPS = (1, 2, 10, 25, 50)
SHAPE = (2, 4, 8, 8)


def _fake_model(seed):
    r = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def model(x, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 0.1 * x + torch.sin(t / 97.0) * r

    return model


def _diffusers_class(name):
    return getattr(diffusers, schedulers.REGISTRY[name].diffusers_class)


def _reference(name, cfg: dict, **extra):
    return _diffusers_class(name).from_config(cfg, **extra)


def _compare_loops(name, cfg: dict, steps, *, karras=False, seed=0):
    """Run both loops; assert agreement at every step; return the worst relative error seen."""
    ref = _reference(name, cfg, **({"use_karras_sigmas": True} if karras else {}))
    ref.set_timesteps(steps)
    ours = make_scheduler(
        name, SchedulerConfig.from_dict(cfg), steps, device="cpu", dtype=torch.float64, karras=karras
    )

    # Timesteps (values and dtype family), loop length, initial noise scale.
    assert len(ours.timesteps) == len(ref.timesteps) == len(ours)
    assert ours.timesteps.dtype == (torch.float32 if name.startswith("euler") else torch.int64)
    assert torch.equal(ours.timesteps, ref.timesteps.to(ours.timesteps.dtype))  # bit-identical values
    assert math.isclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rel_tol=1e-6)

    gen = torch.Generator().manual_seed(seed + 2)
    x0 = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    return _run_both(name, ref, ours, ref.timesteps, x0 * float(ref.init_noise_sigma), x0 * ours.init_noise_sigma, seed)


def _run_both(name, ref, ours, ref_ts, x_ref, x_ours, seed, what="", clean=None):
    """Both loops over `ref_ts` from their starting samples, each on its own outputs; assert
    agreement of every model input and prev_sample; return the worst relative error seen. With
    `clean` (x0, noise): after each step but the last, x0 noised to the next step's level, as
    inpainting's known region is (diffusers reads its step index there; ours a device index)."""
    model = _fake_model(seed + 1)
    ref_gen = torch.Generator().manual_seed(seed + 3)  # diffusers' euler_a and lcm draw from this...
    our_gen = torch.Generator().manual_seed(seed + 3)  # ...and we draw the same, in the same order
    state = ours.init_state(x_ours)
    worst = 0.0
    scale = max(1.0, x_ref.abs().max().item())

    for i, t in enumerate(ref_ts):
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, i)
        err = (in_ours - in_ref).abs().max().item() / scale
        assert err <= TOL, f"{name}{what} step {i}/{len(ref_ts)}: model input differs by {err:.2e}"

        kw = {"generator": ref_gen} if ours.needs_noise else {}
        x_ref = ref.step(model(in_ref, t), t, x_ref, **kw).prev_sample
        noise = randn_tensor(SHAPE, generator=our_gen, dtype=torch.float64) if ours.needs_noise else None
        x_ours = ours.step(model(in_ours, ours.timesteps[i]), i, x_ours, state, noise=noise)

        scale = max(scale, x_ref.abs().max().item())
        err = (x_ours - x_ref).abs().max().item() / scale
        worst = max(worst, err)
        assert err <= TOL, f"{name}{what} step {i}/{len(ref_ts)}: prev_sample differs by {err:.2e} (tol {TOL})"
        if clean is not None and i + 1 < len(ref_ts):
            want = ref.add_noise(*clean, ref_ts[i + 1 : i + 2])
            got = ours.add_noise(*clean, torch.tensor(i + 1))
            err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
            assert err <= TOL, f"{name}{what} after step {i}: add_noise to the next step differs by {err:.2e}"
    return worst


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name, config, steps):
    _compare_loops(name, CONFIGS[config], steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", ["sd15", "vpred"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_karras_matches_diffusers(name, config, steps):
    _compare_loops(name, CONFIGS[config], steps, karras=True)


# Further settings read from the config file, each against the reference.
EXTRA = [
    ("ddim", dict(SD15, clip_sample=True, clip_sample_range=1.0)),
    ("ddim", dict(SD15, prediction_type="sample")),
    ("ddim", dict(VPRED, timestep_spacing="linspace", rescale_betas_zero_snr=True)),
    ("euler", dict(VPRED, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
    ("euler", dict(SD15, final_sigmas_type="sigma_min")),
    ("euler", dict(SD15, use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    ("euler_a", dict(SD15, beta_schedule="squaredcos_cap_v2")),
    ("dpmpp_2m", dict(SD15, solver_type="heun")),
    ("dpmpp_2m", dict(SD15, final_sigmas_type="sigma_min")),
    ("dpmpp_2m", dict(SD15, lower_order_final=False, solver_order=1)),
    ("dpmpp_2m", dict(SD15, euler_at_final=True, timestep_spacing="leading")),
    ("dpmpp_2m", dict(SD15, prediction_type="sample", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1)),
    ("dpmpp_2m", dict(VPRED, rescale_betas_zero_snr=True, timestep_spacing="trailing")),
]


@pytest.mark.parametrize("steps", (3, 20))
@pytest.mark.parametrize("case", range(len(EXTRA)))
def test_config_options_match_diffusers(case, steps):
    name, cfg = EXTRA[case]
    _compare_loops(name, cfg, steps)


def _compare_img2img(name, cfg: dict, steps, strength, seed=0):
    """img2img as diffusers' pipelines run it: timesteps[t_start:], set_begin_index(t_start), the
    clean sample noised by add_noise at the first of them; then both loops, compared each step."""
    entry = schedulers.REGISTRY[name]
    ref = _reference(name, cfg, **entry.diffusers_config)
    ref.set_timesteps(steps)
    t_start = steps - min(int(steps * strength), steps)  # diffusers' get_timesteps (order 1 here)
    ref_ts = ref.timesteps[t_start * ref.order :]
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start * ref.order)
    ours = make_scheduler(name, SchedulerConfig.from_dict(cfg), steps, dtype=torch.float64, strength=strength)
    assert ours.start == t_start and len(ours) == len(ref_ts)
    assert torch.equal(ours.timesteps, ref_ts.to(ours.timesteps.dtype))

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    x_ref = ref.add_noise(clean, noise, ref_ts[:1])
    x_ours = ours.add_noise(clean, noise)
    scale = max(1.0, x_ref.abs().max().item())
    assert (x_ours - x_ref).abs().max().item() / scale <= TOL, f"{name}: add_noise differs"

    _run_both(name, ref, ours, ref_ts, x_ref, x_ours, seed, what=f" at strength {strength}", clean=(clean, noise))


@pytest.mark.parametrize("steps", (1, 4, 10, 25))
@pytest.mark.parametrize("strength", (0.3, 0.75, 1.0))
@pytest.mark.parametrize("config", ["sd15", "vpred"])
@pytest.mark.parametrize("name", schedulers.NAMES)
def test_img2img_start_matches_diffusers(name, config, strength, steps):
    """The truncated schedule of img2img (strength < 1), every scheduler: noise added at the start
    step, multistep warm-ups restarted there (DPM-Solver++'s first-order step, PNDM's Heun step)."""
    if int(steps * strength) < 1:
        with pytest.raises(ValueError, match=rf"strength={strength:g} with steps={steps} leaves no step to run.*at least {math.ceil(1 / strength)}"):
            make_scheduler(name, SchedulerConfig.from_dict(CONFIGS[config]), steps, strength=strength)
        return
    _compare_img2img(name, CONFIGS[config], steps, strength)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_bad_strength_is_named(bad):
    with pytest.raises(ValueError, match=r"strength=.*must be a number in \(0, 1\]"):
        make_scheduler("ddim", SchedulerConfig.from_dict(SD15), 10, strength=bad)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_tensor_index_matches_int_index(name):
    """step(i) with i a 0-dim int64 tensor is the same computation as with a Python int."""
    steps = 6
    sched = make_scheduler(name, SchedulerConfig.from_dict(SD15), steps, dtype=torch.float64)
    model = _fake_model(5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    noises = torch.randn((len(sched), *SHAPE), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xa, xb = x.clone(), x.clone()
    sa, sb = sched.init_state(xa), sched.init_state(xb)
    buffers = {k: v.data_ptr() for k, v in sb.items()}
    for i in range(len(sched)):
        ti = torch.tensor(i)  # 0-dim int64 on the scheduler's device
        assert ti.dim() == 0 and ti.dtype == torch.int64
        assert torch.equal(sched.timestep(ti), sched.timesteps[i])
        ma = model(sched.scale_model_input(xa, i), sched.timesteps[i])
        mb = model(sched.scale_model_input(xb, ti), sched.timestep(ti))
        noise = noises[i] if sched.needs_noise else None
        xa = sched.step(ma, i, xa, sa, noise=noise)
        xb = sched.step(mb, ti, xb, sb, noise=noise)
        assert torch.equal(xa, xb), f"{name} step {i}"
    assert {k: v.data_ptr() for k, v in sb.items()} == buffers  # state updated in place


@pytest.mark.parametrize("name", SCHEDULERS)
def test_missing_keys_take_the_diffusers_class_defaults(name):
    """An empty config resolves to the defaults of the diffusers class `name` stands for."""
    resolved = SchedulerConfig.from_dict({}).for_scheduler(name)
    ref = _diffusers_class(name)().config
    for field in schedulers.KINDS[name].defaults:
        assert getattr(resolved, field) == ref[field], field


def test_config_from_json(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(dict(SD15, _diffusers_version="0.6.0", some_future_key=3)))
    cfg = SchedulerConfig.from_json(path)
    assert cfg == SchedulerConfig.from_dict(SD15)
    assert cfg.class_name == "PNDMScheduler" and cfg.beta_schedule == "scaled_linear"
    assert cfg.timestep_spacing is None  # not in the file: each scheduler applies its own default
    assert cfg.for_scheduler("ddim").timestep_spacing == "leading"
    assert cfg.for_scheduler("dpmpp_2m").timestep_spacing == "linspace"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta_start = 0.1


def test_trained_betas_match_diffusers():
    betas = torch.linspace(1e-4, 0.03, 1000, dtype=torch.float64).tolist()
    cfg = dict(SD15, trained_betas=betas)
    assert SchedulerConfig.from_dict(cfg).trained_betas == tuple(betas)
    _compare_loops("ddim", cfg, 10)


def test_errors():
    cfg = SchedulerConfig.from_dict(SD15)
    with pytest.raises(ValueError, match="allowed values are ddim, pndm, euler, euler_a, dpmpp_2m, lcm, dpmpp_2m_karras"):
        make_scheduler("lms", cfg, 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            make_scheduler("ddim", cfg, bad)
    with pytest.raises(ValueError, match="karras"):
        make_scheduler("ddim", cfg, 10, karras=True)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm", SchedulerConfig.from_dict(dict(SD15, skip_prk_steps=False)), 10)
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler("ddim", SchedulerConfig.from_dict(dict(SD15, thresholding=True)), 10)
    with pytest.raises(ValueError, match="algorithm_type"):
        make_scheduler("dpmpp_2m", SchedulerConfig.from_dict(dict(SD15, algorithm_type="sde-dpmsolver++")), 10)
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("euler_a", SchedulerConfig.from_dict(dict(SD15, prediction_type="sample")), 10)
    for name in ("euler_a", "lcm"):
        with pytest.raises(ValueError, match="noise"):
            s = make_scheduler(name, cfg, 10)
            x = torch.zeros(SHAPE)
            s.step(x, 0, x, s.init_state(x))


def test_lcm_step_range():
    """LCM takes its steps from the 50-step distillation schedule (original_inference_steps): 50
    steps match diffusers, 51 are refused naming the range, as diffusers refuses them."""
    _compare_loops("lcm", SD15, 50)
    with pytest.raises(ValueError, match=r"steps=51: lcm supports 1 to 50 steps \(original_inference_steps=50\)"):
        make_scheduler("lcm", SchedulerConfig.from_dict(SD15), 51)
    ref = _reference("lcm", SD15)
    with pytest.raises(ValueError):
        ref.set_timesteps(51)
    _compare_loops("lcm", dict(SD15, original_inference_steps=20, clip_sample=True), 7)
    # At SD's timesteps c_skip is < 1e-5; a small timestep_scaling makes the skip term count.
    _compare_loops("lcm", dict(SD15, timestep_scaling=0.01), 4)


def test_to_dtype_and_lengths():
    cfg = SchedulerConfig.from_dict(SD15)
    s64 = make_scheduler("dpmpp_2m", cfg, 20, dtype=torch.float64)
    s32 = s64.to(dtype=torch.float32)
    assert s32.coef.dtype == torch.float32 and s64.coef.dtype == torch.float64
    assert torch.equal(s32.coef, s64.coef.float()) and torch.equal(s32.timesteps, s64.timesteps)
    assert len(make_scheduler("pndm", cfg, 20)) == 21 and len(make_scheduler("pndm", cfg, 1)) == 1
    assert len(make_scheduler("euler", cfg, 20)) == 20
    half = make_scheduler("pndm", cfg, 20, strength=0.5)  # img2img: the last 10 steps (11 evaluations)
    assert len(half) == len(half.to(dtype=torch.float64)) == 11 and half.start == 10
    assert torch.equal(half.to(dtype=torch.float64).timesteps, make_scheduler("pndm", cfg, 20).timesteps[10:])


def test_shared_scheduler_is_built_once_per_request():
    """What a pipeline call gets: one scheduler per distinct arguments, equal to a fresh one; other
    arguments give another; the argument checks still run (strength=True is not 1.0); a config
    that cannot be hashed is built unshared."""
    cfg = SchedulerConfig.from_dict(SD15)
    a = schedulers.shared_scheduler("dpmpp_2m", cfg, 17, strength=0.75)
    assert schedulers.shared_scheduler("dpmpp_2m", SchedulerConfig.from_dict(SD15), 17, strength=0.75) is a
    fresh = make_scheduler("dpmpp_2m", cfg, 17, strength=0.75)
    for table in ("timesteps", "c_in", "coef", "noise_coefs"):
        assert torch.equal(getattr(a, table), getattr(fresh, table))
    others = [schedulers.shared_scheduler(n, cfg, s, strength=st) for n, s, st in
              (("dpmpp_2m", 18, 0.75), ("dpmpp_2m", 17, 1.0), ("euler", 17, 0.75))]  # fmt: skip
    assert all(o is not a for o in others) and len({id(o) for o in others}) == 3
    with pytest.raises(ValueError, match="strength=True"):
        schedulers.shared_scheduler("dpmpp_2m", cfg, 17, strength=True)
    unhashable = dataclasses.replace(cfg, skip_prk_steps=[True])  # a PNDM field, as a json list
    with pytest.raises(TypeError):
        hash(unhashable)
    b, c = (schedulers.shared_scheduler("dpmpp_2m", unhashable, 17, strength=0.75) for _ in range(2))
    assert b is not c and torch.equal(b.coef, fresh.coef)


def test_step_traces_as_one_graph():
    """A step with a tensor index is pure tensor code (no .item(), no branch on a tensor value):
    torch.compile(fullgraph=True) raises on any graph break. This is what lets the pipeline
    capture a step in one CUDA graph."""
    cfg = SchedulerConfig.from_dict(SD15)
    for name in SCHEDULERS:
        sched = make_scheduler(name, cfg, 4, dtype=torch.float64)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        noise = noise if sched.needs_noise else None

        def one_step(x, i, state):
            m = 0.1 * sched.scale_model_input(x, i) + torch.sin(sched.timestep(i).double())
            return sched.step(m, i, x, state, noise=noise)

        compiled = torch.compile(one_step, backend="eager", fullgraph=True)
        xa, xb = x.clone(), x.clone()
        sa, sb = sched.init_state(x), sched.init_state(x)
        for i in range(len(sched)):
            xa = one_step(xa, i, sa)
            xb = compiled(xb, torch.tensor(i), sb)
            torch.testing.assert_close(xb, xa, rtol=1e-12, atol=0, msg=f"{name} step {i}")
