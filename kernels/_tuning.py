"""Launch-plan timing shared by the launchers that choose between plans Triton's autotuner cannot
express (a different grid and a second launch): GroupNorm's one- or two-pass plans, attention's
split of the key axis."""

from __future__ import annotations

import functools

import torch
import triton


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors to fill; on CPU (the interpreter) 16: any value works, this one gives the
    test shapes several GroupNorm chunks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def can_time(device: torch.device) -> bool:
    """Plans are timed on a CUDA device running compiled kernels, and never inside a graph capture."""
    return device.type == "cuda" and not triton.knobs.runtime.interpret and not torch.cuda.is_current_stream_capturing()


def time_ms(fn) -> float:
    """Median ms of fn() replayed in a CUDA graph: no launch gaps, as in the pipeline's captured step.

    rep=1: a graph of about 1 ms of calls replayed 10 times. A new image size's first call times
    up to 9 GroupNorm plans for each of its 25 GroupNorm shapes at 512x512 (18 in the UNet, 7 in
    the VAE decoder); at rep=5 the replays alone took 10 x 5 ms a plan, over 11 s in all."""
    from triton.testing import do_bench_cudagraph

    torch.cuda.current_stream().synchronize()  # the timing runs on its own stream: inputs must be ready
    return do_bench_cudagraph(fn, rep=1, return_mode="median")


def fastest(plans: dict, run) -> tuple[str, dict]:
    """(name of the fastest plan, {name: ms}) with run(plan) timed for each plan."""
    times = {name: time_ms(lambda plan=plan: run(plan)) for name, plan in plans.items()}
    return min(times, key=times.get), times
