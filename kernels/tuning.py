"""Launch-plan timing shared by the launchers that choose between plans Triton's autotuner cannot
express (a different grid and a second launch): GroupNorm's launch plans, attention's split of
the key axis, and (in fastdiff.ops) Triton vs torch's SDPA per attention shape."""

from __future__ import annotations

import functools
import math

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


def time_ms(fn, target_ms: float = 0.5, replays: int = 10) -> float:
    """Median ms of one fn() call, from CUDA-graph replays of back-to-back calls (no launch gaps,
    as in the pipeline's captured step).

    The graph's length is set from its own GPU time (about target_ms a replay), not from an eager
    estimate as in triton.testing.do_bench_cudagraph: there a plan with more launches, or more
    Python per call, got fewer calls per replay, so the fixed cost of starting a replay (a few
    us) weighed more on it; at 1 ms of eager time per replay a 3-launch plan at 8x8 gets a few
    dozen calls of a few us each (an estimate, not measured). 0.5 ms x 10 replays keeps the
    first call of a new image size short (up to 9 GroupNorm plans for each of 25 shapes at
    512x512)."""
    torch.cuda.current_stream().synchronize()  # the timing runs on its own stream: inputs must be ready
    with torch.cuda.stream(torch.cuda.Stream()):
        fn()  # compilation and allocations, outside the graph
        calls = 8
        for _ in range(3):  # 8 calls, then sized from their time (then once more if far off)
            graph, captured = _capture(fn, calls), calls
            ms = _replay_ms(graph)
            if ms >= target_ms / 2 or calls >= _MAX_CALLS:
                break
            calls = min(_MAX_CALLS, max(2 * calls, math.ceil(calls * target_ms / max(ms, 1e-4))))
        times = sorted(_replay_ms(graph) / captured for _ in range(replays))
    return times[len(times) // 2]


_MAX_CALLS = 4096  # calls per graph at most (a 1 us kernel: 4 ms a replay)


def _capture(fn, calls: int):
    """A CUDA graph of `calls` back-to-back fn() calls, replayed once to upload it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return graph


def _replay_ms(graph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def fastest(plans: dict, run) -> tuple[str, dict]:
    """(name of the fastest plan, {name: ms}) with run(plan) timed for each plan."""
    times = {name: time_ms(lambda plan=plan: run(plan)) for name, plan in plans.items()}
    return min(times, key=times.get), times
