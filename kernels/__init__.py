"""Fused Triton kernels (installed as fastdiff.kernels)."""
