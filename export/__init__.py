"""Export of fastdiff networks to ONNX / TensorRT (installed as fastdiff.export).

    python -m fastdiff.export sd15 --fp16          # ONNX, checked, cached by content hash
    python -m fastdiff.export sd15 --engine tensorrt

`find_export` (cheap: hashes and a manifest) is importable without pulling in the exporter.
"""

if __name__ == "export":  # found from a checkout's root, under PyPI's `export` package name
    from fastdiff.shadowing import yield_to_installed

    yield_to_installed(__name__, __file__)
else:
    from fastdiff.export.cache import ExportOptions, Shapes, cache_root, find_export

    __all__ = ["ExportOptions", "Shapes", "cache_root", "export", "find_export"]

    def export(*args, **kwargs):
        """See `fastdiff.export.onnx_export.export`."""
        from fastdiff.export.onnx_export import export as _export

        return _export(*args, **kwargs)
