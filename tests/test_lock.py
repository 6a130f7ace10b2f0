"""constraints.txt (the lock) pins every requirement that pyproject.toml declares, within its range.

A dependency added to pyproject.toml without refreshing the lock would install unpinned in CI and
on every fresh machine: the README's refresh command must run, and this fails until it has.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+: the lock is compiled for CPython 3.11")

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("dev", "onnx")  # the README's two commands install these


def read_lock(text: str) -> dict[str, Version]:
    """name -> pinned version, from pip-compile's output (comments, markers and blank lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # a lock line pins exactly one version
        assert spec.operator == "==", line
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def declared() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    reqs = list(project["dependencies"])
    for extra in LOCKED_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    reqs += pyproject["build-system"]["requires"]
    return [Requirement(r) for r in reqs]


def test_lock_pins_every_declared_requirement_within_its_range():
    pins = read_lock((ROOT / "constraints.txt").read_text())
    missing, outside = [], []
    for r in declared():
        pin = pins.get(canonicalize_name(r.name))
        if pin is None:
            missing.append(str(r))
        elif not r.specifier.contains(pin, prereleases=True):
            outside.append(f"{r} (locked {pin})")
    assert not missing, f"not in constraints.txt (run the README's refresh command): {missing}"
    assert not outside, f"locked outside pyproject.toml's range: {outside}"
    assert "pip" in pins  # the README's commands install pip itself from the lock first


def test_read_lock_parses_pip_compile_output():
    text = "# header\ntorch==2.13.0+cpu\n    # via fastdiff\ntriton==3.9.0 ; platform_system == \"Linux\"\n\n# The following\npip==26.3\n"
    assert read_lock(text) == {"torch": Version("2.13.0+cpu"), "triton": Version("3.9.0"), "pip": Version("26.3")}
    with pytest.raises(AssertionError):
        read_lock("numpy>=2\n")
