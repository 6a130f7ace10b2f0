"""No file or folder of the checkout answers to the top-level name of an installed distribution.

Each way of starting the project puts one of its folders first on sys.path: `python -m ...` and
`python -c ...` the current folder (the root, in the README's commands), `python benchmarks/x.py`
benchmarks/, `python training/x.py` training/, pytest tests/. Every module there is then
importable under its bare name ahead of site-packages. transformers imports Hugging Face's
`kernels` package; a benchmarks/kernels.py once answered instead and broke every diffusers
import. These tests fail the day a file or a newly installed package brings such a clash back.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("", "benchmarks", "training", "tests")  # each one sys.path[0] for some entry point
OWN = "fastdiff"  # our distribution: its own names are not a clash


def importable_names(folder: Path) -> set[str]:
    """Top-level names that `folder` first on sys.path makes importable as regular modules or
    packages. A folder without __init__.py is only a namespace portion: an installed package of
    the same name wins over it, so it is not counted."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return {n for n in names if n.isidentifier()}


def installed_names() -> set[str]:
    """Top-level import names of every installed distribution but ours."""
    return {name for name, dists in importlib.metadata.packages_distributions().items() if set(dists) - {OWN}}


def import_from(folder: Path, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose sys.path[0] is `folder`, as `python -c` from there."""
    return subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300)


def origin(folder: Path, name: str) -> str:
    """Where `import name` leads when `folder` is first on sys.path: a file path, or the error."""
    code = f"import importlib\ntry:\n    print(importlib.import_module({name!r}).__file__)\nexcept ModuleNotFoundError as e:\n    print('ModuleNotFoundError', e)"
    proc = import_from(folder, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def in_checkout(path: str) -> bool:
    """A project file, not an installed one (the venv may live inside the checkout, as CI's .venv)."""
    if path.startswith("ModuleNotFoundError"):
        return False
    path = Path(path).resolve()
    return path.is_relative_to(ROOT) and not path.is_relative_to(Path(sys.prefix).resolve())


@pytest.mark.parametrize("sub", FOLDERS, ids=lambda s: s or "root")
def test_no_project_name_shadows_an_installed_distribution(sub):
    """Every name the folder offers that an installed distribution also owns must still import
    that distribution from there, never the checkout's file."""
    folder = ROOT / sub
    clashes = sorted(importable_names(folder) & installed_names())
    wrong = {name: where for name in clashes if in_checkout(where := origin(folder, name))}
    assert not wrong, f"{folder} shadows installed distributions (rename these files): {wrong}"


@pytest.mark.parametrize("name", sorted(importable_names(ROOT) - {OWN}))
def test_root_packages_import_only_under_fastdiff(name):
    """`kernels/` and `export/` are fastdiff.kernels and fastdiff.export: from the root their bare
    names give the installed distribution of that name, or ModuleNotFoundError, never our code."""
    where = origin(ROOT, name)
    assert not in_checkout(where), f"`import {name}` from the root loaded {where}"
    assert where.startswith("ModuleNotFoundError") == (name not in installed_names()), where
    assert origin(ROOT, f"fastdiff.{name}") == str(ROOT / name / "__init__.py")


@pytest.mark.parametrize("sub", FOLDERS, ids=lambda s: s or "root")
def test_transformers_hub_kernels_get_the_real_package(sub):
    """transformers' hub-kernels integration, imported as the README's commands and the scripts
    start, binds Hugging Face's `kernels` package (a transformers dependency)."""
    code = (
        "import kernels, transformers.integrations.hub_kernels as hub\n"
        "assert hub.CUDAProperties is kernels.CUDAProperties\n"
        "print(kernels.__file__)"
    )
    if "kernels" not in installed_names():
        proc = import_from(ROOT / sub, "import kernels")
        assert "ModuleNotFoundError" in proc.stderr, proc.stderr[-2000:]
        return
    proc = import_from(ROOT / sub, code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not in_checkout(proc.stdout.strip()), proc.stdout
