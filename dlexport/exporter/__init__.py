"""Hugging Face decoder-only model -> embed.onnx, layers/layer_NN.onnx, head.onnx, manifest.json."""
from .onnx_export import DEFAULT_OPSET, ExportDirError, export
from .sources import EMBEDDED_DEFAULT, RANDOM_SHAPES, ModelSourceError, load_model

__all__ = ["DEFAULT_OPSET", "EMBEDDED_DEFAULT", "RANDOM_SHAPES", "ExportDirError", "ModelSourceError", "export",
           "load_model"]
