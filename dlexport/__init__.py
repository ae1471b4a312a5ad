"""dlexport: dynamic-depth inference for decoder-only LLMs, from Hugging Face to per-layer ONNX / TensorRT engines."""
__version__ = "0.1.0"
