"""Fused Triton kernels (installed as fastdiff.kernels), one module each; each launcher matches its
torch reference in fastdiff/ops.py:

  attention.attention(q, k, v, scale=None)                    flash-attention forward
  group_norm.group_norm(x, num_groups, weight, bias, eps, silu)  GroupNorm (+ SiLU)
  geglu.geglu(h)                                              x * gelu(gate), one pass

On the CPU, `attention_cpu.attention` (AVX512-BF16, AMX where present), `group_norm_cpu.group_norm`
(AVX-512), `matmul_few_rows_cpu.conv2d` (AMX) and `winograd_cpu.conv2d` (AVX512-BF16 without AMX)
are C kernels (`*.c` beside them), compiled at first use by `cpu_library`.

Each Triton module also has `launches(...)`: its kernel calls as data (`launch.Launch`), which
benchmarks/sm90_build.py compiles. The package binds no names over its modules, so
`import fastdiff.kernels.attention as m` is the module.

It needs triton (Linux x86_64); fastdiff.ops imports it only on the Triton path. Triton decides at
import time whether kernels are compiled or interpreted: set TRITON_INTERPRET=1 before the first
import to run them on CPU tensors (how the tests check them).
"""

if __name__ == "kernels":  # found from a checkout's root, under Hugging Face's package name
    from fastdiff.shadowing import yield_to_installed

    yield_to_installed(__name__, __file__)
else:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # e.g. macOS / Windows: the torch path of fastdiff.ops still works
        raise ImportError(
            "fastdiff.kernels needs triton (Linux x86_64); FASTDIFF_KERNELS=torch runs the torch ops instead"
        ) from e
