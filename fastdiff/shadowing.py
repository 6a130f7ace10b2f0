"""Keeps the repository's top-level `kernels/` and `export/` folders from shadowing installed packages.

Those folders are installed as `fastdiff.kernels` and `fastdiff.export`. But `python -m ...` and
`python -c ...` put the current folder first on sys.path, so from a checkout's root
`import kernels` finds `kernels/__init__.py` before Hugging Face's `kernels` package, which
transformers imports (`from kernels import CUDAProperties`), and `import export` finds ours
before PyPI's `export`. Each folder's `__init__.py` calls `yield_to_installed` when it is
imported under its bare name, so the name means what it means without the checkout: the
installed distribution, or ModuleNotFoundError.

Why not drop their `__init__.py` (a namespace folder never shadows a regular package)? Then
`fastdiff.kernels` does not import in an editable install, whose finder needs the file, nor from
the root, where `fastdiff` is found in the checkout and has no `kernels` beside it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def yield_to_installed(name: str, init_file: str) -> None:
    """Load the installed top-level module `name` in place of the checkout's folder being imported
    under that name (its `__init__.py` is `init_file`); raise ModuleNotFoundError if none is installed."""
    checkout = Path(init_file).resolve().parent.parent
    path = [p for p in sys.path if Path(p or ".").resolve() != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} is installed; the checkout's {name}/ folder imports only as fastdiff.{name}",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement in progress returns this entry
    spec.loader.exec_module(module)
