"""Samplers for SD1.5 (DDIM, PNDM/PLMS, Euler, Euler ancestral, DPM-Solver++ 2M, LCM), built for graph capture.

Each scheduler reproduces the timesteps and step outputs of the diffusers class of the same kind
created with `from_config(scheduler_config.json)`, but is laid out differently: everything that
depends only on the step index is derived once, on the host in float64, into per-step tables on the
device:

    timesteps [N]     what the UNet is fed (int64 for ddim / pndm / dpmpp_2m, float32 for euler*)
    c_in      [N]     the input scale applied by `scale_model_input`
    coef      [N, K]  the coefficients of step i's update, one row per step

so a step is a handful of elementwise tensor ops weighted by one coefficient row: no `.item()`, no host sync and
no Python branch on a tensor value. Warm-up, first-step and final-step special cases are different
rows, not branches, and multistep history lives in fixed-size buffers (`init_state`) updated in
place. The step index `i` may be a Python int or a 0-dim int64 tensor on the scheduler's device, so
one step can be captured in a CUDA graph and replayed with the index tensor advanced.

Contract shared by all schedulers: the loop runs `len(scheduler.timesteps)` model evaluations (PNDM
evaluates the model N + 1 times for N steps, repeating a timestep, like diffusers):

    state = sched.init_state(latents)
    for i in range(len(sched.timesteps)):
        eps = unet(sched.scale_model_input(latents, i), sched.timesteps[i], ...)
        latents = sched.step(eps, i, latents, state, noise=noise_i if sched.needs_noise else None)

Keep the latents and the scheduler in float32 (or float64) even when the UNet runs in half
precision: some coefficients are large (1 / sqrt(alpha_bar) reaches ~14.6).

The training schedule (betas, alpha_bar) is computed in float32 with torch, as the reference
implementation does, and so are the tables diffusers stores in float32 (its sigma tables); every
value derived from them is then computed in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdiff.weights import read_config



# ----------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class SchedulerConfig:
    """The fields of a diffusers `scheduler_config.json` that change the sampling numbers.

    A field is None when the file does not give it; `for_scheduler(name)` fills those in with the
    default of the diffusers class that `name` reproduces (the defaults differ per class, e.g.
    `timestep_spacing` is "leading" for DDIM/PNDM and "linspace" for Euler/DPM-Solver).
    """

    class_name: str | None = None
    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str | None = None
    timestep_spacing: str | None = None
    steps_offset: int | None = None
    rescale_betas_zero_snr: bool | None = None
    # DDIM / PNDM
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    clip_sample_range: float | None = None
    thresholding: bool | None = None
    skip_prk_steps: bool | None = None
    # Euler / DPM-Solver sigma schedules
    interpolation_type: str | None = None
    timestep_type: str | None = None
    use_karras_sigmas: bool | None = None
    use_exponential_sigmas: bool | None = None
    use_beta_sigmas: bool | None = None
    use_lu_lambdas: bool | None = None
    use_flow_sigmas: bool | None = None
    use_dynamic_shifting: bool | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str | None = None
    # DPM-Solver
    solver_order: int | None = None
    algorithm_type: str | None = None
    solver_type: str | None = None
    lower_order_final: bool | None = None
    euler_at_final: bool | None = None
    lambda_min_clipped: float | None = None
    variance_type: str | None = None
    # LCM
    original_inference_steps: int | None = None
    timestep_scaling: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        """Known keys are read, others ("_diffusers_version", ...) ignored, as `from_config` does."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "_class_name" in d:
            kw["class_name"] = d["_class_name"]
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(float(b) for b in kw["trained_betas"])
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(read_config(path))

    def for_scheduler(self, name: str) -> "SchedulerConfig":
        """Every field filled in as the diffusers class for `name` sees it (a field that class
        does not have takes a value that switches its feature off)."""
        own = scheduler_entry(name).cls.defaults
        values = dict(_OFF)
        for k, default in own.items():
            given = getattr(self, k)
            values[k] = default if given is None else given
        return dataclasses.replace(self, **values)


_COMMON = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    prediction_type="epsilon",
    steps_offset=0,
)
# Values of the fields a class does not have: the feature is off.
_OFF = dict(
    rescale_betas_zero_snr=False,
    set_alpha_to_one=False,
    clip_sample=False,
    clip_sample_range=1.0,
    thresholding=False,
    skip_prk_steps=True,
    interpolation_type="linear",
    timestep_type="discrete",
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
    use_lu_lambdas=False,
    use_flow_sigmas=False,
    use_dynamic_shifting=False,
    sigma_min=None,
    sigma_max=None,
    final_sigmas_type="zero",
    solver_order=1,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    lambda_min_clipped=-math.inf,
    variance_type=None,
    original_inference_steps=50,
    timestep_scaling=10.0,
)


def _require(cfg: SchedulerConfig, name: str, field: str, allowed: tuple) -> None:
    value = getattr(cfg, field)
    if value not in allowed:
        supported = ", ".join(map(repr, allowed))
        raise ValueError(f"{name}: {field}={value!r} is not supported (supported: {supported})")


# ----------------------------------------------------------------------------------------------
# Training noise schedule (host, once)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR 0."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def _alphas_cumprod(cfg: SchedulerConfig) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1, float32 (computed as the reference computes it)."""
    T = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(T)
    else:
        raise ValueError(
            f"beta_schedule={cfg.beta_schedule!r} is not supported "
            "(supported: 'linear', 'scaled_linear', 'squaredcos_cap_v2', or trained_betas)"
        )
    if cfg.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _spaced_timesteps(cfg: SchedulerConfig, n: int, *, round_linspace: bool) -> np.ndarray:
    """The N training timesteps to visit, descending (float64 holding integers, or fractions for
    an unrounded linspace). Table 2 of Lin et al. 2023 names the three spacings."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        ts = ts.round() if round_linspace else ts.astype(np.float32).astype(np.float64)
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + cfg.steps_offset
    elif cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(
            f"timestep_spacing={cfg.timestep_spacing!r} is not supported "
            "(supported: 'linspace', 'leading', 'trailing')"
        )
    return np.ascontiguousarray(ts, dtype=np.float64)


def check_spacing(name: str, cfg: SchedulerConfig, num_steps: int, timesteps_for) -> None:
    """Refuse a step count whose timesteps (`timesteps_for(n)`, descending) repeat one or leave
    [0, T - 1]: a repeated timestep is a zero step size (DPM-Solver then divides by it and returns
    NaN), and one past T - 1 indexes outside the training schedule (an IndexError, or a clamped,
    wrong sigma). The error names the largest step count this spacing supports."""
    T = cfg.num_train_timesteps

    def ok(n: int) -> bool:
        ts = timesteps_for(n)
        return len(ts) == n and ts.min() >= 0 and ts.max() <= T - 1 and bool(np.all(np.diff(ts) < 0))

    if ok(num_steps):
        return
    top = next((n for n in range(min(num_steps, T), 0, -1) if ok(n)), 0)
    raise ValueError(
        f"steps={num_steps}: {name} with timestep_spacing={cfg.timestep_spacing!r} over the model's {T} "
        f"training timesteps supports 1 to {top} steps (more would repeat timesteps or leave the trained range)"
    )


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log sigma, clamped to
    [0, T-1]. `log_sigmas` ascends with t."""
    log_s = np.log(np.maximum(sigmas, 1e-10))
    lo = np.clip(np.searchsorted(log_sigmas, log_s, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[lo] - log_s) / (log_sigmas[lo] - log_sigmas[lo + 1]), 0, 1)
    return (1 - w) * lo + w * (lo + 1)


def _f32(x) -> np.ndarray:
    """Round to float32 and back: the precision diffusers stores its sigma tables in."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Base class


def check_num_steps(num_steps) -> int:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: must be an integer >= 1")
    return num_steps


class Scheduler:
    """Per-step tables on a device, plus the update rule that consumes one row of them.

    Subclasses fill `_host` (float64 / int numpy tables) for the whole loop in `__init__` from
    `self.config` and implement `step`. `start` > 0 (img2img's strength < 1) drops the first
    `start` evaluations, as diffusers' `timesteps[t_start:]` with `set_begin_index(t_start)` does:
    multistep schedulers restart their warm-up there, so their rows are built knowing `start`;
    `add_noise` noises a clean sample to the first remaining step.
    """

    name = ""  # what `scheduler=` takes
    diffusers_class = ""  # the diffusers scheduler this one reproduces (the tests' and benchmarks' reference)
    defaults: dict = {}  # that class's __init__ defaults (diffusers 0.3x-0.4x), for the fields it has
    supports_karras = False  # takes karras=True (Karras et al. 2022 sigmas)
    karras_name: str | None = None  # a `scheduler=` name for this class with Karras sigmas
    karras = False  # whether this instance uses Karras sigmas
    needs_noise = False  # True: `step` takes this step's standard normal noise as `noise`

    def __init__(self, config: SchedulerConfig, num_steps: int, *, device, dtype: torch.dtype, start: int = 0):
        check_num_steps(num_steps)
        if not 0 <= start < num_steps:
            raise ValueError(f"start={start!r}: must be in [0, num_steps={num_steps})")
        self.config = config.for_scheduler(self.name)  # missing keys -> this class's defaults
        self.num_steps, self.start = num_steps, start
        self.init_noise_sigma = 1.0
        self._host: dict[str, np.ndarray] = {}
        self._timestep_dtype = torch.int64

    def _finish(self, device, dtype) -> None:
        """Drop the rows before `start`, then place the tables; called at the end of each subclass __init__."""
        self._host = {k: v[self.start :] for k, v in self._host.items()}
        self._place(device, dtype)

    def _place(self, device, dtype) -> None:
        """Move the (kept) host tables to the device in `dtype`."""
        h = self._host
        assert h["coef"].shape[0] == h["c_in"].shape[0] == h["timesteps"].shape[0] == h["noise"].shape[0]
        self._scales_input = bool(np.any(h["c_in"] != 1.0))  # static: the table, not a tensor value
        self.device, self.dtype = torch.device(device), dtype
        self.timesteps = torch.as_tensor(h["timesteps"]).to(device=self.device, dtype=self._timestep_dtype)
        self.c_in = torch.as_tensor(h["c_in"]).to(device=self.device, dtype=dtype)
        self.coef = torch.as_tensor(h["coef"]).to(device=self.device, dtype=dtype)
        self.noise_coefs = torch.as_tensor(h["noise"]).to(device=self.device, dtype=dtype)  # [evals, 2]: (a, b) per step

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Scheduler":
        """A copy with the tables on `device` / in `dtype` (re-rounded from the float64 host tables)."""
        out = copy.copy(self)
        out._place(device if device is not None else self.device, dtype if dtype is not None else self.dtype)
        return out

    def __len__(self) -> int:
        """Model evaluations in a full loop (= len(timesteps))."""
        return int(self._host["timesteps"].shape[0])

    def _row(self, table: torch.Tensor, i) -> torch.Tensor:
        """Row i of a per-step table, for a Python int or a 0-dim int64 device tensor (no sync)."""
        if isinstance(i, torch.Tensor):
            return table.index_select(0, i.reshape(1))[0]
        return table[int(i)]

    def timestep(self, i) -> torch.Tensor:
        """timesteps[i] as a 0-dim device tensor, for `i` an int or a 0-dim device tensor."""
        return self._row(self.timesteps, i)

    def scale_model_input(self, sample: torch.Tensor, i) -> torch.Tensor:
        """The UNet's input at step i: sample * c_in[i] (a no-op for variance-preserving samplers)."""
        if not self._scales_input:
            return sample
        return sample * self._row(self.c_in, i)

    def add_noise(self, sample: torch.Tensor, noise: torch.Tensor, i=0) -> torch.Tensor:
        """A clean sample noised to step i's noise level (img2img's start: i = 0; inpainting's
        known region after step i: i + 1): a x0 + b noise, (a, b) = (sqrt(alpha_bar_t),
        sqrt(1 - alpha_bar_t)) or, for sigma-parametrised samplers, (1, sigma). `i` an int or a
        0-dim device tensor (no sync)."""
        a, b = self._row(self.noise_coefs, i).unbind(0)
        return a * sample + b * noise

    def init_state(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fixed-size buffers for the multistep history, zeroed; `step` updates them in place."""
        return {}

    def step(self, model_output: torch.Tensor, i, sample: torch.Tensor, state: dict, noise=None) -> torch.Tensor:
        """The sample after evaluation i, from the model's output at (scale_model_input(sample, i),
        timesteps[i]); `state` (from init_state) is updated in place, `noise` only if needs_noise."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.num_steps}, evals={len(self)}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def _data_and_noise(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray, name: str):
    """Coefficients (p0, p1, q0, q1) with x0 = p0 x + p1 m and eps = q0 x + q1 m, for the model
    output m of a variance-preserving sample x = alpha x0 + sigma eps (alpha^2 + sigma^2 = 1)."""
    one, zero = np.ones_like(alpha), np.zeros_like(alpha)
    if prediction_type == "epsilon":
        return 1 / alpha, -sigma / alpha, zero, one
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
        return alpha, -sigma, sigma, alpha
    if prediction_type == "sample":
        return zero, one, 1 / sigma, -alpha / sigma
    raise ValueError(
        f"{name}: prediction_type={prediction_type!r} is not supported "
        "(supported: 'epsilon', 'v_prediction', 'sample')"
    )


def _require_x0_prediction(cfg: SchedulerConfig, name: str) -> None:
    """The configs DDIM and LCM take: any prediction type, no dynamic thresholding."""
    if cfg.thresholding:
        raise ValueError(f"{name}: thresholding=True is not supported (it is meant for pixel-space models)")
    _require(cfg, name, "prediction_type", ("epsilon", "v_prediction", "sample"))


def predicted_x0(p0, p1, sample, model_output, clip: float | None) -> torch.Tensor:
    """x0 = p0 x + p1 m, clamped to [-clip, clip] when the config's clip_sample asks (a flag fixed
    at construction, not a tensor branch)."""
    x0 = p0 * sample + p1 * model_output
    return x0 if clip is None else x0.clamp(-clip, clip)


# ----------------------------------------------------------------------------------------------
# DDIM


class DDIM(Scheduler):
    """DDIM (Song et al. 2021), deterministic (eta = 0).

    coef row: [p0, p1, q0, q1, sqrt(alpha_bar_prev), sqrt(1 - alpha_bar_prev)].
    """

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults = dict(
        _COMMON,
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        thresholding=False,
        timestep_spacing="leading",
        rescale_betas_zero_snr=False,
    )

    def __init__(self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, start: int = 0):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        _require_x0_prediction(cfg, "ddim")
        T = cfg.num_train_timesteps
        check_spacing("ddim", cfg, num_steps, lambda n: _spaced_timesteps(cfg, n, round_linspace=True))
        ac = _alphas_cumprod(cfg).double().numpy()
        final = 1.0 if cfg.set_alpha_to_one else ac[0]  # alpha_bar "before" t = 0

        # 1. Timesteps t_i, and the previous one t_i - T // N (diffusers steps by T // N whatever the spacing).
        ts = _spaced_timesteps(cfg, num_steps, round_linspace=True).astype(np.int64)
        prev = ts - T // num_steps
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)

        # 2. Predicted x0 and eps from the model output (eq. 12's "predicted x0" and the noise term).
        p0, p1, q0, q1 = _data_and_noise(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t), "ddim")

        # 3. Eq. 12 with sigma_t = 0: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps.
        coef = np.stack([p0, p1, q0, q1, np.sqrt(a_prev), np.sqrt(1 - a_prev)], axis=1)  # [N, 6]
        self._clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
        noise = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t)], axis=1)  # [N, 2]
        self._host = dict(timesteps=ts, c_in=np.ones(len(ts)), coef=coef, noise=noise)
        self._finish(device, dtype)

    def step(self, model_output, i, sample, state=None, noise=None):
        p0, p1, q0, q1, a_prev, s_prev = self._row(self.coef, i).unbind(0)
        x0 = predicted_x0(p0, p1, sample, model_output, self._clip)
        eps = q0 * sample + q1 * model_output
        return a_prev * x0 + s_prev * eps


# ----------------------------------------------------------------------------------------------
# PNDM (PLMS part only, skip_prk_steps=True)

# Adams-Bashforth weights on eps_n, eps_{n-1}, ...: PLMS' linear multistep combination.
_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


class PNDM(Scheduler):
    """Pseudo linear multistep (PLMS) from PNDM (Liu et al. 2022), with the Runge-Kutta warm-up
    replaced, as in diffusers' `skip_prk_steps=True`, by a Heun (trapezoidal) first step.

    For N steps the model is evaluated N + 1 times (N = 1: once). Evaluation 0 takes an Euler-like
    step from t_0; evaluation 1 goes back to the input of evaluation 0 and redoes that step with
    the mean of both model outputs; from evaluation 2 on, the Adams-Bashforth combination of up to
    4 outputs (skipping evaluation 1's output) feeds PNDM's transfer part phi.

    State: `eps` [4, *shape] = the last four model outputs, newest first; `x_prev` = the previous
    evaluation's input sample. coef row: [c_x, c_xprev, c_m, c_eps0, c_eps1, c_eps2, c_eps3].
    """

    name = "pndm"
    diffusers_class = "PNDMScheduler"
    defaults = dict(_COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading")

    def __init__(self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, start: int = 0):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        if not cfg.skip_prk_steps:
            raise ValueError("pndm: only skip_prk_steps=True (the Stable Diffusion setting) is supported")
        _require(cfg, "pndm", "prediction_type", ("epsilon", "v_prediction"))
        T = cfg.num_train_timesteps
        check_spacing("pndm", cfg, num_steps, lambda n: _spaced_timesteps(cfg, n, round_linspace=True))
        r = T // num_steps  # diffusers' step size for prev_timestep, whatever the spacing
        ac = _alphas_cumprod(cfg).double().numpy()
        final = 1.0 if cfg.set_alpha_to_one else ac[0]

        # 1. Evaluation timesteps: t_0, t_1, t_1, t_2, ..., t_{N-1} (t_1 repeated).
        ts = _spaced_timesteps(cfg, num_steps, round_linspace=True)[::-1].astype(np.int64)  # ascending
        ts = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        n = len(ts)

        rows = []
        for e in range(n):
            c = e - start  # evaluations since the (truncated) start: the warm-up restarts there
            t, t_prev = int(ts[e]), int(ts[e]) - r
            w_x, w_xprev = 1.0, 0.0
            if c < 0:
                rows.append([0.0] * 7)  # dropped by _finish
                continue
            if c == 1:  # redo evaluation 0's step from its input, with the mean of the two outputs
                t, t_prev = t + r, t
                w_x, w_xprev = 0.0, 1.0
                w_out = [0.5, 0.5, 0.0, 0.0, 0.0]  # on [m_1, m_0, -, -, -]
            else:
                # The outputs PLMS combines: evaluations 0, 2, 3, ..., c (not 1), last four of them.
                used = ([0] + list(range(2, c + 1)))[-4:][::-1]  # newest first
                w_out = [0.0] * 5  # weight on m_c, then on the history slots m_{c-1}, ..., m_{c-4}
                for w, j in zip(_AB[len(used)], used):
                    w_out[c - j] = w
            # 2. Transfer part phi: x_prev = sqrt(a_p / a_t) x - (a_p - a_t) eps / denom.
            a_t = ac[t]
            a_p = ac[t_prev] if t_prev >= 0 else final
            denom = a_t * math.sqrt(1 - a_p) + math.sqrt(a_t * (1 - a_t) * a_p)
            k = (a_p - a_t) / denom
            if cfg.prediction_type == "epsilon":
                A, B = math.sqrt(a_p / a_t), -k
            else:  # v_prediction: eps = sqrt(a_t) v + sqrt(1 - a_t) x, x the step's base sample
                A, B = math.sqrt(a_p / a_t) - k * math.sqrt(1 - a_t), -k * math.sqrt(a_t)
            rows.append([A * w_x, A * w_xprev] + [B * w for w in w_out])
        a_t = ac[ts]
        noise = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t)], axis=1)  # [n, 2]
        self._host = dict(timesteps=ts, c_in=np.ones(n), coef=np.array(rows, dtype=np.float64), noise=noise)  # coef [n, 7]
        self._finish(device, dtype)

    def init_state(self, sample):
        return {
            "eps": torch.zeros((4, *sample.shape), device=sample.device, dtype=sample.dtype),  # [4, *shape]
            "x_prev": torch.zeros_like(sample),
        }

    def step(self, model_output, i, sample, state, noise=None):
        row = self._row(self.coef, i)
        c_x, c_xprev, c_m = row[0], row[1], row[2]
        eps, x_prev = state["eps"], state["x_prev"]
        hist = torch.tensordot(row[3:], eps, dims=1)  # sum_k c_eps_k * eps[k]
        out = c_x * sample + c_xprev * x_prev + c_m * model_output + hist
        # Update the history in place: newest output in slot 0, this input becomes x_prev.
        eps.copy_(eps.roll(1, dims=0))
        eps[0].copy_(model_output)
        x_prev.copy_(sample)
        return out


# ----------------------------------------------------------------------------------------------
# Euler and Euler ancestral (Karras et al. 2022, variance-exploding parametrisation)


def _euler_sigmas(name: str, cfg: SchedulerConfig, num_steps: int, ac: torch.Tensor, *, karras: bool):
    """(timesteps float32 [N], sigmas float64 [N + 1]) as EulerDiscreteScheduler.set_timesteps."""
    sig_train = (((1 - ac) / ac) ** 0.5).numpy()  # float32 [T], sigma = sqrt((1 - a) / a)
    check_spacing(name, cfg, num_steps, lambda n: _spaced_timesteps(cfg, n, round_linspace=False))
    ts = _spaced_timesteps(cfg, num_steps, round_linspace=False)
    sigmas = np.interp(ts.astype(np.float32), np.arange(len(sig_train)), sig_train)  # float64 [N]
    if karras:
        s_min = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        s_max = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        sigmas = _karras_sigmas(s_min, s_max, num_steps)
        ts = _sigma_to_t(sigmas, np.log(sig_train))
    s_end = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.final_sigmas_type == "sigma_min" else 0.0
    return ts.astype(np.float32), _f32(np.append(sigmas, s_end))


def _ve_init_noise_sigma(cfg: SchedulerConfig, sigmas: np.ndarray) -> float:
    """Std of the initial latent as diffusers defines it: sigma_max, or sqrt(sigma_max^2 + 1) with
    "leading" spacing."""
    smax = float(sigmas.max())
    return smax if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(smax**2 + 1)


def _ve_data(prediction_type: str, s: np.ndarray, name: str):
    """(p0, p1) with x0 = p0 x + p1 m for a VE sample x = x0 + s eps and model output m."""
    if prediction_type == "epsilon":
        return np.ones_like(s), -s
    if prediction_type == "v_prediction":  # v taken on the VP sample x / sqrt(s^2 + 1)
        return 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1)
    if prediction_type == "sample":
        return np.zeros_like(s), np.ones_like(s)
    raise ValueError(f"{name}: prediction_type={prediction_type!r} is not supported")


class Euler(Scheduler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma
    (Karras et al. 2022, Algorithm 1 without its second-order correction). The UNet sees
    x / sqrt(sigma^2 + 1).

    coef row: [c_x, c_m] with x_next = c_x x + c_m m.
    """

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    supports_karras = True
    defaults = dict(
        _COMMON,
        interpolation_type="linear",
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        sigma_min=None,
        sigma_max=None,
        timestep_spacing="linspace",
        timestep_type="discrete",
        rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )

    def __init__(
        self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, karras: bool = False,
        start: int = 0,
    ):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        for field in ("use_exponential_sigmas", "use_beta_sigmas"):
            _require(cfg, "euler", field, (False,))
        _require(cfg, "euler", "interpolation_type", ("linear",))
        _require(cfg, "euler", "timestep_type", ("discrete",))
        _require(cfg, "euler", "final_sigmas_type", ("zero", "sigma_min"))
        ac = _alphas_cumprod(cfg)
        if cfg.rescale_betas_zero_snr:
            ac[-1] = 2**-24  # keep sigma_max finite
        karras = self.karras = karras or bool(cfg.use_karras_sigmas)

        # 1. Timesteps and sigmas (Karras eq. 5 spacing when karras).
        ts, s = _euler_sigmas(self.name, cfg, num_steps, ac, karras=karras)
        s_i, s_next = s[:-1], s[1:]

        # 2. x0 from the model output, d = (x - x0) / sigma_i, x_next = x + (sigma_{i+1} - sigma_i) d.
        p0, p1 = _ve_data(cfg.prediction_type, s_i, "euler")
        dt = s_next - s_i
        coef = np.stack([1 + dt * (1 - p0) / s_i, -dt * p1 / s_i], axis=1)  # [N, 2]

        self._timestep_dtype = torch.float32
        self.init_noise_sigma = _ve_init_noise_sigma(cfg, s)
        noise = np.stack([np.ones_like(s_i), s_i], axis=1)  # x0 + sigma noise
        self._host = dict(timesteps=ts, c_in=1 / np.sqrt(s_i**2 + 1), coef=coef, noise=noise)
        self._finish(device, dtype)

    def step(self, model_output, i, sample, state=None, noise=None):
        c_x, c_m = self._row(self.coef, i).unbind(0)
        return c_x * sample + c_m * model_output


class EulerAncestral(Scheduler):
    """Euler ancestral sampling (eta = 1): an Euler step down to sigma_down, then fresh noise of
    std sigma_up, with sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    sigma_down^2 = sigma_next^2 - sigma_up^2, so the marginal at sigma_next is kept.

    `step` needs this step's standard normal `noise` (same shape as the sample).
    coef row: [c_x, c_m, c_noise].
    """

    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    defaults = dict(_COMMON, timestep_spacing="linspace", rescale_betas_zero_snr=False)
    needs_noise = True

    def __init__(self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, start: int = 0):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        _require(cfg, "euler_a", "prediction_type", ("epsilon", "v_prediction"))
        ac = _alphas_cumprod(cfg)
        if cfg.rescale_betas_zero_snr:
            ac[-1] = 2**-24
        ts, s = _euler_sigmas(self.name, cfg, num_steps, ac, karras=False)
        s_i, s_next = s[:-1], s[1:]

        # 1. Split the step: sigma_up (fresh noise) and sigma_down (deterministic part).
        s_up = np.sqrt(s_next**2 * (s_i**2 - s_next**2) / s_i**2)
        s_down = np.sqrt(s_next**2 - s_up**2)

        # 2. Euler step to sigma_down, then add sigma_up * noise.
        p0, p1 = _ve_data(cfg.prediction_type, s_i, "euler_a")
        dt = s_down - s_i
        coef = np.stack([1 + dt * (1 - p0) / s_i, -dt * p1 / s_i, s_up], axis=1)  # [N, 3]

        self._timestep_dtype = torch.float32
        self.init_noise_sigma = _ve_init_noise_sigma(cfg, s)
        noise = np.stack([np.ones_like(s_i), s_i], axis=1)  # x0 + sigma noise
        self._host = dict(timesteps=ts, c_in=1 / np.sqrt(s_i**2 + 1), coef=coef, noise=noise)
        self._finish(device, dtype)

    def step(self, model_output, i, sample, state=None, noise=None):
        if noise is None:
            raise ValueError("euler_a: step() needs this step's standard normal noise (noise=...)")
        c_x, c_m, c_n = self._row(self.coef, i).unbind(0)
        return c_x * sample + c_m * model_output + c_n * noise


# ----------------------------------------------------------------------------------------------
# DPM-Solver++ (2M)


class DPMSolverPP2M(Scheduler):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Algorithm 2, data prediction.

    With alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t (VP), lambda = log(alpha_t / sigma_t),
    h_i = lambda_{i+1} - lambda_i and r_i = h_{i-1} / h_i:

        x0_i = data prediction from the model output at step i
        D_i  = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}     (midpoint; first order: D_i = x0_i)
        x_{i+1} = (sigma_{t_{i+1}} / sigma_{t_i}) x_i - alpha_{t_{i+1}} (e^{-h_i} - 1) D_i

    The first step, and the last one(s) under `lower_order_final` / a final sigma of 0, are first
    order: that is a row with zero weight on x0_{i-1}.

    State: `x0_prev` = the previous step's data prediction.
    coef row: [p0, p1, c_x, c_x0, c_x0prev] with x0 = p0 x + p1 m and
    x_next = c_x x + c_x0 x0 + c_x0prev x0_prev.
    """

    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    supports_karras = True
    karras_name = "dpmpp_2m_karras"  # "DPM++ 2M Karras"
    defaults = dict(
        _COMMON,
        solver_order=2,
        thresholding=False,
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        lower_order_final=True,
        euler_at_final=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        use_flow_sigmas=False,
        final_sigmas_type="zero",
        lambda_min_clipped=-math.inf,
        variance_type=None,
        timestep_spacing="linspace",
        rescale_betas_zero_snr=False,
        use_dynamic_shifting=False,
    )

    def __init__(
        self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, karras: bool = False,
        start: int = 0,
    ):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        _require(cfg, "dpmpp_2m", "algorithm_type", ("dpmsolver++",))
        _require(cfg, "dpmpp_2m", "solver_type", ("midpoint", "heun"))
        _require(cfg, "dpmpp_2m", "solver_order", (1, 2))
        _require(cfg, "dpmpp_2m", "final_sigmas_type", ("zero", "sigma_min"))
        _require(cfg, "dpmpp_2m", "variance_type", (None,))
        _require(cfg, "dpmpp_2m", "prediction_type", ("epsilon", "v_prediction", "sample"))
        for field in ("thresholding", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                      "use_flow_sigmas", "use_dynamic_shifting"):  # fmt: skip
            _require(cfg, "dpmpp_2m", field, (False,))
        T = cfg.num_train_timesteps
        ac = _alphas_cumprod(cfg)
        if cfg.rescale_betas_zero_snr:
            ac[-1] = 2**-24
        karras = self.karras = karras or bool(cfg.use_karras_sigmas)

        # 1. Timesteps: N + 1 spaced points, the last (t = 0 end) dropped.
        lambdas = (torch.log(ac.sqrt()) - torch.log((1 - ac).sqrt())).flip(0).numpy()  # ascending in index
        last_t = T - int(np.searchsorted(lambdas, cfg.lambda_min_clipped, side="left"))
        n = num_steps

        def spaced(n: int) -> np.ndarray:
            if cfg.timestep_spacing == "linspace":
                return np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1]
            if cfg.timestep_spacing == "leading":
                return (np.arange(0, n + 1) * (last_t // (n + 1))).round()[::-1][:-1] + cfg.steps_offset
            if cfg.timestep_spacing == "trailing":
                return np.arange(last_t, 0, -T / n).round() - 1
            raise ValueError(f"dpmpp_2m: timestep_spacing={cfg.timestep_spacing!r} is not supported")

        if not karras:  # Karras sigmas are distinct whatever their rounded timesteps
            check_spacing("dpmpp_2m", cfg, n, spaced)
        ts = spaced(n).astype(np.int64)

        # 2. Sigmas (VE) at those timesteps, or Karras et al. eq. 5 over the whole training range.
        sig_train = (((1 - ac) / ac) ** 0.5).numpy()  # float32 [T]
        if karras:
            sigmas = _karras_sigmas(float(sig_train[0]), float(sig_train[-1]), n)
            ts = _sigma_to_t(sigmas, np.log(sig_train))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
            ts = ts.astype(np.int64)
        else:
            sigmas = np.interp(ts, np.arange(T), sig_train)
        s_end = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.final_sigmas_type == "sigma_min" else 0.0
        s = _f32(np.append(sigmas, s_end))  # [N + 1]
        N = len(ts)

        # 3. Per-step alpha_t, sigma_t, lambda; lambda = +inf at sigma = 0.
        alpha = 1 / np.sqrt(s**2 + 1)
        sig = s * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sig)

        # 4. Data prediction x0 = p0 x + p1 m at each step, then the update's weights, row by row.
        p0, p1, _, _ = _data_and_noise(cfg.prediction_type, alpha[:-1], sig[:-1], "dpmpp_2m")
        rows = []
        for i in range(N):
            # diffusers' lower_order_final / euler_at_final / zero final sigma: first order at the end
            # (its lower_order_second only matters for solver_order 3).
            at_end = i == N - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and N < 15) or cfg.final_sigmas_type == "zero"
            )
            first_order = cfg.solver_order == 1 or i <= start or at_end  # the warm-up restarts at start
            h = lam[i + 1] - lam[i]
            phi = -np.expm1(-h)  # 1 - e^{-h}; 1 when sigma_{i+1} = 0 (h = inf)
            c_x = sig[i + 1] / sig[i]
            c_d = alpha[i + 1] * phi  # x_{i+1} = c_x x_i + c_d D_i
            if first_order:  # DPM-Solver++ 1 (= DDIM in data-prediction form)
                c_x0, c_x0prev = c_d, 0.0
            else:
                r = (lam[i] - lam[i - 1]) / h
                if cfg.solver_type == "midpoint":
                    c_x0, c_x0prev = c_d * (1 + 0.5 / r), -c_d * 0.5 / r
                else:  # heun: D1 weight alpha ((e^{-h} - 1) / h + 1) = alpha (1 - phi / h)
                    w1 = alpha[i + 1] * (1 - phi / h) / r
                    c_x0, c_x0prev = c_d + w1, -w1
            rows.append([p0[i], p1[i], c_x, c_x0, c_x0prev])

        noise = np.stack([alpha[:-1], sig[:-1]], axis=1)  # [N, 2]: alpha_t x0 + sigma_t noise
        self._host = dict(timesteps=ts, c_in=np.ones(N), coef=np.array(rows, dtype=np.float64), noise=noise)  # coef [N, 5]
        self._finish(device, dtype)

    def init_state(self, sample):
        return {"x0_prev": torch.zeros_like(sample)}

    def step(self, model_output, i, sample, state, noise=None):
        p0, p1, c_x, c_x0, c_x0prev = self._row(self.coef, i).unbind(0)
        x0_prev = state["x0_prev"]
        x0 = p0 * sample + p1 * model_output
        out = c_x * sample + c_x0 * x0 + c_x0prev * x0_prev
        x0_prev.copy_(x0)
        return out


# ----------------------------------------------------------------------------------------------
# LCM


class LCM(Scheduler):
    """Latent consistency model sampling (Luo et al. 2023), multistep: each step maps the sample to
    the consistency function's output, denoised = c_out x0 + c_skip x (the boundary-condition
    scalings at t), then re-noises it to the next timestep with fresh noise (none after the last).
    For LCM-distilled UNets and LCM-LoRA: 2-8 steps at guidance 1-2.

    Timesteps: `original_inference_steps` (50) evenly spaced training timesteps k - 1, 2k - 1, ...
    (k = T // 50), of which `num_steps` are taken at evenly spaced indices, descending.
    coef row: [p0, p1, c_out, c_skip, sqrt(alpha_bar_next), sqrt(1 - alpha_bar_next)] (the last
    row [.., 1, 0]: no re-noising). `step` needs this step's standard normal `noise`.
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    defaults = dict(
        _COMMON,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=50,
        clip_sample=False,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        thresholding=False,
        timestep_spacing="leading",
        timestep_scaling=10.0,
        rescale_betas_zero_snr=False,
    )
    needs_noise = True

    def __init__(self, config: SchedulerConfig, num_steps: int, *, device="cpu", dtype=torch.float32, start: int = 0):
        super().__init__(config, num_steps, device=device, dtype=dtype, start=start)
        cfg = self.config
        _require_x0_prediction(cfg, "lcm")
        T, original = cfg.num_train_timesteps, int(cfg.original_inference_steps)
        if not 1 <= original <= T:
            raise ValueError(f"lcm: original_inference_steps={original} must be in [1, num_train_timesteps={T}]")
        if num_steps > original:
            raise ValueError(f"steps={num_steps}: lcm supports 1 to {original} steps (original_inference_steps={original})")
        ac = _alphas_cumprod(cfg).double().numpy()

        # 1. Timesteps: the distillation schedule, num_steps of it at evenly spaced indices.
        origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
        ts = origin[np.floor(np.linspace(0, original, num_steps, endpoint=False)).astype(np.int64)]
        a_t = ac[ts]
        a_next = np.append(ac[ts[1:]], 1.0)  # the last step is not re-noised: its row is [.., 1, 0]

        # 2. x0 from the model output, then the boundary-condition scalings (sigma_data 0.5).
        p0, p1, _, _ = _data_and_noise(cfg.prediction_type, np.sqrt(a_t), np.sqrt(1 - a_t), "lcm")
        scaled = ts * float(cfg.timestep_scaling)
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / np.sqrt(scaled**2 + 0.25)
        coef = np.stack([p0, p1, c_out, c_skip, np.sqrt(a_next), np.sqrt(1 - a_next)], axis=1)  # [N, 6]
        self._clip = float(cfg.clip_sample_range) if cfg.clip_sample else None
        noise = np.stack([np.sqrt(a_t), np.sqrt(1 - a_t)], axis=1)  # [N, 2]
        self._host = dict(timesteps=ts.astype(np.int64), c_in=np.ones(num_steps), coef=coef, noise=noise)
        self._finish(device, dtype)

    def step(self, model_output, i, sample, state=None, noise=None):
        if noise is None:
            raise ValueError("lcm: step() needs this step's standard normal noise (noise=...)")
        p0, p1, c_out, c_skip, a_next, s_next = self._row(self.coef, i).unbind(0)
        x0 = predicted_x0(p0, p1, sample, model_output, self._clip)
        denoised = c_out * x0 + c_skip * sample
        return a_next * denoised + s_next * noise


# ----------------------------------------------------------------------------------------------
# The registry: every `scheduler=` name, read by the pipeline, the CLI, the tests and the
# benchmarks. Adding a scheduler = one class (name, diffusers_class, defaults) in KINDS + its
# parity test.


@dataclass(frozen=True)
class SchedulerEntry:
    """One `scheduler=` name: the class that runs it, with Karras sigmas or not, and the diffusers
    scheduler it reproduces."""

    name: str
    cls: type
    karras: bool = False

    @property
    def diffusers_class(self) -> str:
        return self.cls.diffusers_class

    @property
    def diffusers_config(self) -> dict:
        """What the diffusers class gets on top of the model's scheduler config."""
        return {"use_karras_sigmas": True} if self.karras else {}


KINDS = {cls.name: cls for cls in (DDIM, PNDM, Euler, EulerAncestral, DPMSolverPP2M, LCM)}
SCHEDULERS = tuple(KINDS)  # one per class
REGISTRY = {name: SchedulerEntry(name, cls) for name, cls in KINDS.items()}
REGISTRY.update({c.karras_name: SchedulerEntry(c.karras_name, c, karras=True) for c in KINDS.values() if c.karras_name})
NAMES = tuple(REGISTRY)  # every `scheduler=` value


def scheduler_entry(name: str) -> SchedulerEntry:
    if name not in REGISTRY:
        raise ValueError(f"scheduler={name!r}: allowed values are {', '.join(NAMES)}")
    return REGISTRY[name]


def make_scheduler(
    name: str,
    config: SchedulerConfig,
    num_steps: int,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    karras: bool = False,
    strength: float = 1.0,
) -> Scheduler:
    """The scheduler `name` (one of NAMES) for `num_steps` steps, tables on `device` in `dtype`.

    `config` is the model's scheduler config; missing keys take the defaults of the diffusers class
    `name` stands for. `karras=True` uses Karras sigmas (= use_karras_sigmas=True; euler and
    dpmpp_2m only), as a `*_karras` name does; a config that already asks for them gets them either way.
    `strength` < 1 (img2img) runs only the last int(num_steps * strength) steps (`start_step`).
    """
    entry = scheduler_entry(name)
    start = start_step(check_num_steps(num_steps), strength)
    if not (karras or entry.karras):
        return entry.cls(config, num_steps, device=device, dtype=dtype, start=start)
    if not entry.cls.supports_karras:
        raise ValueError(f"karras=True: {name} has no Karras sigma schedule (use euler or dpmpp_2m)")
    return entry.cls(config, num_steps, device=device, dtype=dtype, karras=True, start=start)


def shared_scheduler(name: str, config: SchedulerConfig, num_steps: int, **options) -> Scheduler:
    """`make_scheduler(name, config, num_steps, **options)`, built once per distinct arguments and
    shared by every caller: what a pipeline call uses. A scheduler is read-only after construction
    (`init_state` gives each loop its own buffers), and building its tables on the host in float64
    costs milliseconds a request, several times that on a CPU just back from idle
    (`benchmarks/latency.py`'s end_to_end against the sum of its stages). Callers must not write to
    it; `make_scheduler` gives a private one."""
    try:
        hash(config)
    except TypeError:  # a config value of an unhashable type (a list in its json): build it, unshared
        return make_scheduler(name, config, num_steps, **options)
    return _shared_scheduler(name, config, num_steps, **options)


@functools.lru_cache(maxsize=64, typed=True)  # typed: strength=True must still fail make_scheduler's check
def _shared_scheduler(name, config, num_steps, **options) -> Scheduler:
    return make_scheduler(name, config, num_steps, **options)


def start_step(num_steps: int, strength: float) -> int:
    """The first step img2img runs at `strength`, as diffusers' img2img pipelines count it: the last
    int(num_steps * strength) of `num_steps` steps run; a ValueError names strength when none would."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r}: must be a number in (0, 1]")
    kept = min(int(num_steps * strength), num_steps)
    if kept < 1:
        raise ValueError(
            f"strength={strength:g} with steps={num_steps} leaves no step to run (int(steps * strength) = 0); "
            f"raise steps to at least {math.ceil(1 / strength)} or strength"
        )
    return num_steps - kept
