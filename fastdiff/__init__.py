"""fastdiff: a lean, fast inference runtime for latent diffusion (Stable Diffusion 1.5).

    import fastdiff
    image = fastdiff.generate("a photo of a cat")

Importing this package is cheap: torch models are built, and diffusers/transformers are never
imported, until the first call that needs them.
"""

__version__ = "0.1.0"

__all__ = ["generate", "Pipeline", "__version__"]


def __getattr__(name):
    if name in ("generate", "Pipeline"):
        from fastdiff import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
