"""A kernel call as data, so the launcher that runs it and benchmarks/sm90_build.py, which compiles
it for sm_90 without a GPU, share one description of each kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Launch:
    """kernel[grid](*args, **meta): one call, built by a module's `launches()`, run by calling it."""

    kernel: Any  # a @triton.jit function, possibly wrapped by triton.autotune / triton.heuristics
    grid: tuple | Callable[[dict], tuple]  # programs per axis, or a function of the chosen constexprs
    args: tuple  # the runtime arguments in the kernel's order: tensors, ints, floats
    meta: dict  # constexprs by name, and num_warps / num_stages

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.meta)
