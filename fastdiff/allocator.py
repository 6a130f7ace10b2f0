"""Keep freed CPU memory in the process for the next op, instead of handing it back to the OS.

torch has no caching allocator on the CPU: every op's output comes from malloc. glibc serves an
allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh mmap, unmaps it on
free, and trims the heap's free top back to the OS, so the next op's output page-faults its way
in, zero-filled by the kernel. At the VAE decoder's sizes (64 MiB activations for one 512x512
image) the faults cost more than an elementwise op's own work (`benchmarks/profile_step.py
--network vae`, with and without FASTDIFF_CPU_ALLOCATOR=system; figures in
benchmarks/NOTES-cpu.md). onnxruntime and OpenVINO keep their own arenas.

So a CPU torch backend raises both glibc thresholds once for the process: large blocks come from
the heap and stay there when freed, and the process keeps its peak heap (as torch's CUDA caching
allocator keeps its peak) instead of faulting it in again on every call. Not every fault goes:
glibc's aligned allocation cannot always reuse a freed block of exactly its size, so a freed
block is reused when it has merged with free space beside it. It is a process-wide
setting, logged when made; `FASTDIFF_CPU_ALLOCATOR=system` leaves glibc's defaults. Other C
libraries (musl, macOS, Windows) are left alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger("fastdiff")

ENV = "FASTDIFF_CPU_ALLOCATOR"  # "keep" (the default) or "system"
# mallopt parameters (glibc's malloc.h) and the value for both: blocks up to 1 GiB come from the
# heap, and up to 1 GiB of free heap top stays mapped.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once. Returns whether they were
    raised (False: opted out, not glibc, or glibc refused the values; the reason is logged)."""
    choice = os.environ.get(ENV, "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"{ENV}={choice!r}: use 'keep' (reuse freed CPU memory, the default) or 'system' (glibc's defaults)")
    if choice == "system":
        log.info("fastdiff: %s=system, glibc's malloc thresholds left as they are", ENV)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not (libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD)):
        log.warning("fastdiff: glibc refused mallopt thresholds of %d bytes; large CPU tensors stay mmap'ed per op", THRESHOLD)
        return False
    log.info("fastdiff: glibc keeps freed CPU memory for reuse (mmap/trim thresholds 1 GiB; %s=system turns it off)", ENV)
    return True
