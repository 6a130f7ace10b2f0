"""Fused Triton kernels (installed as fastdiff.kernels).

Public launchers, each matching its torch reference in fastdiff/ops.py:
  attention(q, k, v, scale=None)                         flash-attention forward
  group_norm(x, num_groups, weight, bias, eps, silu=False)  GroupNorm (+ SiLU)
  geglu(h)                                                x * gelu(gate), one pass

Without triton installed this package still imports; calling a launcher raises ImportError.
Triton decides at import time whether kernels are compiled or interpreted: set TRITON_INTERPRET=1
before the first import to run them on CPU tensors (how the tests check them).
"""

if __name__ == "kernels":  # found from a checkout's root, under Hugging Face's package name
    from fastdiff.shadowing import yield_to_installed

    yield_to_installed(__name__, __file__)
else:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # e.g. macOS / Windows: the torch reference path in fastdiff.ops still works
        _TRITON_ERROR = e

        def _missing(*args, **kwargs):
            raise ImportError(
                "fastdiff.kernels needs triton (Linux x86_64); use FASTDIFF_KERNELS=torch for the torch path"
            ) from _TRITON_ERROR

        attention = group_norm = geglu = _missing
    else:
        # Importing a submodule binds its module object to the package attribute of the same name;
        # these from-imports rebind the names to the launcher functions.
        from .attention import attention
        from .geglu import geglu
        from .group_norm import group_norm

    __all__ = ["attention", "group_norm", "geglu"]
