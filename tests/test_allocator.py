"""fastdiff.allocator: a CPU torch backend makes glibc keep freed large blocks for the next op.

Each check runs in a fresh interpreter (the setting is process-wide and cannot be undone) and
reads glibc's own accounting (mallinfo2): how many blocks are mmap'ed while a 64 MiB tensor lives,
and how many of its bytes stay mapped in the heap, free for the next op, once it is freed.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="glibc's mallinfo2 is needed to observe the allocator",
)

PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    import torch

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    how = sys.argv[1]
    result = {}
    if how == "function":
        from fastdiff import allocator
        result["raised"] = allocator.keep_freed_memory()
    elif how == "backend":
        from fastdiff import Pipeline
        Pipeline.from_pretrained("tiny-shapes", backend="torch", device="cpu")
    before = libc.mallinfo2()
    x = torch.empty(64 << 20, dtype=torch.uint8)
    x.fill_(1)
    during = libc.mallinfo2()
    del x
    after = libc.mallinfo2()
    result["mmapped_blocks_added"] = during.hblks - before.hblks
    result["freed_bytes_kept"] = after.fordblks - during.fordblks  # free but still mapped in the heap
    print(json.dumps(result))
    """
)


def probe(how: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_glibc_defaults_map_and_unmap_each_large_tensor():
    """The reference: without fastdiff's setting a 64 MiB tensor is its own mmap, gone on free."""
    r = probe("none")
    assert r["mmapped_blocks_added"] == 1
    assert r["freed_bytes_kept"] < 1 << 20


def test_kept_memory_is_reused_from_the_heap():
    r = probe("function")
    assert r["raised"] is True
    assert r["mmapped_blocks_added"] == 0
    assert r["freed_bytes_kept"] >= 64 << 20


def test_cpu_torch_backend_keeps_freed_memory():
    r = probe("backend")
    assert r["mmapped_blocks_added"] == 0
    assert r["freed_bytes_kept"] >= 64 << 20


def test_system_opt_out_leaves_glibc_defaults():
    r = probe("function", FASTDIFF_CPU_ALLOCATOR="system")
    assert r["raised"] is False
    assert r["mmapped_blocks_added"] == 1
    assert r["freed_bytes_kept"] < 1 << 20


def test_bad_setting_names_the_variable():
    out = subprocess.run(
        [sys.executable, "-c", "from fastdiff import allocator; allocator.keep_freed_memory()"],
        env={**os.environ, "FASTDIFF_CPU_ALLOCATOR": "jemalloc"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "FASTDIFF_CPU_ALLOCATOR='jemalloc'" in out.stderr
