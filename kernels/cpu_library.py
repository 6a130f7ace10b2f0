"""C kernels for the CPU (sources in this package), built once per machine with the system's C
compiler and called through ctypes.

A library is compiled with `$CC` (else `cc`) and -march=native at first use, into
`$FASTDIFF_CACHE/kernels/` under a name made from the sha256 of the source and the headers it
includes from beside it, the flags, the compiler's version and the CPU's feature flags; it is
written under a temporary name and renamed, so a half-written library is never loaded, and one
that fails to load is deleted and built again, once. Where it cannot be built or loaded
`library()` returns None and says why; the caller then runs torch's op (the same math). ctypes
releases the GIL for a call; OpenMP threads come from the libgomp.so.1 that torch has already
loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from fastdiff import precision
from fastdiff.export.cache import cache_root

log = logging.getLogger("fastdiff")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}


def compiler() -> str | None:
    """The C compiler's path ($CC, else cc), or None."""
    return shutil.which(os.environ.get("CC", "cc"))


def headers(source: Path) -> list[Path]:
    """The headers beside `source` that it includes (`#include "name.h"`), which its library's
    cache key must cover too."""
    names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), flags=re.MULTILINE)
    return [source.with_name(name) for name in names]


def library_path(cc: str, source: Path, flags: tuple[str, ...]) -> Path:
    """Where `source` (with its `headers`), built by `cc` with `flags` for this CPU, lives in the cache."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    h = hashlib.sha256()
    cpu = " ".join(sorted(precision.cpu_flags())) + " " + platform.machine()  # what -march=native targets
    code = b"".join(path.read_bytes() for path in [source, *headers(source)])
    for part in (code, " ".join(flags).encode(), version.encode(), cpu.encode()):
        h.update(hashlib.sha256(part).digest())
    return cache_root() / "kernels" / f"{source.stem}-{h.hexdigest()[:24]}.so"


def build(cc: str, source: Path, flags: tuple[str, ...], path: Path) -> None:
    """Compile `source` into `path` atomically (a temporary name in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        result = subprocess.run([cc, *flags, "-o", str(tmp), str(source), "-lm"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {result.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(source: Path, extra_flags: tuple[str, ...], declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """Build (unless cached) and load the C file `source`; `declare` sets the argument types and
    raises AttributeError when a symbol is missing. Raises where it cannot."""
    cc = compiler()
    if cc is None:
        raise RuntimeError(f"no C compiler found ({os.environ.get('CC', 'cc')!r}; set CC)")
    flags = FLAGS + extra_flags
    path = library_path(cc, source, flags)
    if not path.exists():
        build(cc, source, flags, path)
    try:
        lib = ctypes.CDLL(str(path))
        declare(lib)
    except (OSError, AttributeError):  # damaged (truncated, foreign): build it again, once
        path.unlink(missing_ok=True)
        build(cc, source, flags, path)
        lib = ctypes.CDLL(str(path))
        declare(lib)
    return lib


def request_amx(init) -> None:
    """Call a library's AMX init function (`amx_request` of amx_tiles.h): RuntimeError where Linux
    refuses this process the tile state, which `library` logs as a refusal, not a damaged file."""
    init.argtypes = []
    init.restype = ctypes.c_int
    if init() != 0:
        raise RuntimeError("Linux refused this process the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")


def library(source: Path, extra_flags: tuple[str, ...], declare: Callable[[ctypes.CDLL], None], fallback: str) -> ctypes.CDLL | None:
    """The loaded library, built and loaded once per process; None where it cannot be, logged once
    with the reason and `fallback` (what runs instead). `declare` may also raise RuntimeError with
    the reason (e.g. the OS refuses a CPU feature); that is not taken for a damaged file."""
    with _lock:
        if source not in _loaded:
            try:
                _loaded[source] = load(source, extra_flags, declare)
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("fastdiff: the CPU kernel %s is unavailable, %s runs instead: %s", source.name, fallback, e)
                _loaded[source] = None
        return _loaded[source]


def forget(source: Path) -> None:
    """Drop the process's loaded-library record for `source` (tests build it again)."""
    with _lock:
        _loaded.pop(source, None)
