"""Export of fastdiff networks to ONNX / TensorRT (installed as fastdiff.export)."""
