"""Backends that run the three networks: torch, onnxruntime, tensorrt."""
