"""edge-run: export image-text models to ONNX/TensorRT bundles and run them without PyTorch.

    model = edgerun.load("blip-bundle")
    model.caption("photo.jpg", num_beams=3).text

Attributes are imported on first use, so `import edgerun` stays light.
"""
from __future__ import annotations

from .errors import EdgeRunError

__version__ = "0.1.0"
__all__ = ["Answer", "Caption", "EdgeRunError", "Model", "__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "Model", "Caption", "Answer"):
        from .runtime import model

        return getattr(model, name)
    raise AttributeError(f"module 'edgerun' has no attribute {name!r}")
